"""The search page at ``/`` and its files, as the gateway serves them (the page in a browser:
``tests/test_web_page.py``)."""

from __future__ import annotations

import re

from gateway.app import STATIC


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<meta name="viewport"' in page.text
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/nothing.js").status_code == 404


def test_every_element_the_script_names_is_on_the_page():
    html = (STATIC / "index.html").read_text()
    script = (STATIC / "app.js").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    named = set(re.findall(r'\$\("([\w-]+)"\)', script))
    filters = re.search(r"TEXT_FILTERS = \[([^\]]+)\]", script).group(1)
    named |= {f"filter-{name}" for name in re.findall(r'"(\w+)"', filters)}
    named |= {f"crop-{name}" for name in "xywh"} | {"year-gte", "year-lte"}
    assert named - ids == set()
    for label_for in re.findall(r'data-for="([^"]+)"', html):  # where an error's field is marked invalid
        assert label_for in ids
