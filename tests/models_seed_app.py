"""The seed's ``my_app``: the Flask-SQLAlchemy ``db`` its demo imports.

``create_app(url)`` makes a Flask app on a database URL, for the tests.
"""

from __future__ import annotations

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


def create_app(database_url: str, name: str = "my_app") -> Flask:
    app = Flask(name)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db.init_app(app)
    return app
