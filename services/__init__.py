"""The HTTP chat service, built on ragpt.serving only.

This folder is installed as the package `ragpt_service` (see pyproject.toml), so installing ragpt
adds no generic top-level `services` package to site-packages: `from ragpt_service.app import create_app`.
"""
