"""Recipes that cross the registry and the library (``patchlab``): each drives ``Registry`` and the
library's verbs end to end. ``demo`` now; upgrade and publish belong here too."""
