"""torchtitan recipes for memcompile models: ``python -m recipes.pretrain``, ``recipes.evaluate``,
``recipes.generate``. Importing the package first drops the import-time messages of torchao
that mean nothing to a user (see ``recipes/shims.py``)."""

from recipes import shims

shims.quiet_import_messages()
