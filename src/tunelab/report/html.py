"""report.html: report.md rendered to one self-contained page, its plots embedded as data URIs.

Nothing in the page refers to the network or to other files, so it can be mailed or archived on its own."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; }
td:not(:first-child) { text-align: right; }
img { max-width: 100%; display: block; margin: 1em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def write_html(out_dir: Path, markdown_text: str, title: str = "tunelab comparison",
               name: str = "report.html") -> Path:
    import markdown

    converter = markdown.Markdown(extensions=["tables"])
    # HTML written in the Markdown is shown as text, never rendered: report.md quotes data (prompts, answers,
    # labels, errors), and a page that ran a `<script>` from a training file could not be mailed around
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(markdown_text)
    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)"', lambda m: embedded_image(out_dir, m), body)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
    path = out_dir / name
    path.write_text(page, encoding="utf-8")
    return path


def embedded_image(out_dir: Path, match: re.Match) -> str:
    """The report's own plots only (a PNG under plots/): an image reference from anywhere else is not read."""
    alt, source = match.group(1), match.group(2)
    plots = (out_dir / "plots").resolve()
    file = (out_dir / source).resolve()
    if file.suffix != ".png" or plots not in file.parents:
        return f'<img alt="{alt} (not embedded: {html.escape(source)} is not one of the report\'s plots)" src="data:,"'
    if not file.is_file():  # never a broken reference: say what is missing instead
        return f'<img alt="{alt} (missing: {html.escape(source)})" src="data:,"'
    data = base64.b64encode(file.read_bytes()).decode("ascii")
    return f'<img alt="{alt}" src="data:image/png;base64,{data}"'
