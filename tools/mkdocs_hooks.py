"""mkdocs hook: the docstrings' Sphinx roles (``:class:`X```, ``:func:`X```, ...) as plain code.

The docstrings are read by Sphinx-minded tools and by ``help()``; mkdocstrings renders the
role names literally (``:class:<code>X</code>``) and reST's ``::`` before a literal block, so
the built pages drop them.
"""

import re

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>~?")


def on_page_content(html: str, **_: object) -> str:
    return _ROLE.sub("<code>", html).replace("::</p>", ":</p>")  # (reST's literal-block marker)
