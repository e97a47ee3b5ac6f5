"""Fetch one file of a published package from a Python package index without pip.

The index is $PIP_INDEX_URL when set (read through its JSON simple API, PEP 691), else PyPI's JSON API.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

PYPI_JSON_URL = "https://pypi.org/pypi/{package}/{version}/json"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
TIMEOUT_S = 30


class DownloadCancelled(Exception):
    """A download given up because its cancel event was set (the server is stopping)."""


def download_from_json_api(
    package: str, version: str, filename: str, dest: Path, cancel: threading.Event | None = None
) -> Path:
    """Download `filename` of `package`==`version` into `dest` (with a progress bar); returns its path.
    Setting `cancel` ends it with DownloadCancelled."""
    url = file_url(package, version, filename)
    return stream_download(url, dest / filename, cancel)


def file_url(package: str, version: str, filename: str) -> str:
    index = os.environ.get("PIP_INDEX_URL", "").strip()
    if index:
        page = f"{index.rstrip('/')}/{package}/"
        files = _get_json(page, SIMPLE_JSON).get("files", [])
        urls = [urljoin(page, entry["url"]) for entry in files if entry.get("filename") == filename]
    else:
        release = _get_json(PYPI_JSON_URL.format(package=package, version=version), "application/json")
        urls = [entry["url"] for entry in release.get("urls", []) if entry.get("filename") == filename]
    if not urls:
        raise ValueError(f"the package index lists no {filename} for {package}=={version}")
    return str(urls[0])


def _get_json(url: str, accept: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        data: dict[str, Any] = json.load(response)
        return data


def stream_download(url: str, target: Path, cancel: threading.Event | None = None) -> Path:
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, target.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {target.name}") as progress:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(f"stopped while downloading {target.name}")
                out.write(chunk)
                progress.update(len(chunk))
    return target
