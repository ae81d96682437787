"""Built-in augmentation recipes, one per file, each marked with ``dalikd.recipes.recipe``.

Installed, this folder is the ``dalikd.pipelines`` package; ``dalikd pipelines`` lists it.
"""
