"""The shipped recipes (data only), installed as ``binaryduo.recipes`` so that
``importlib.resources.files("binaryduo.recipes")`` finds them in a wheel and in an editable
install alike.

This file is what makes that work in the editable install: without it setuptools maps the folder
to a namespace package whose path also holds its placeholder entry, and Python 3.11's
``importlib.resources`` refuses such a namespace (``NotADirectoryError``).
"""
