"""The import path deployments name: `serve run serve_tp.app:build_app`, service.yaml's import_path.

The builder lives in `serve_tp.api.app`; this module keeps the path that existing
service configs and scripts use.
"""

from serve_tp.api.app import build_app, parse_config

__all__ = ["build_app", "parse_config"]
