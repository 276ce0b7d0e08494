"""Small text utilities: slugs, word wrapping, identifier case conversion."""

from textkit.case import camel_case, kebab_case, snake_case, words
from textkit.slug import slugify
from textkit.wrap import wrap

__all__ = ["camel_case", "kebab_case", "slugify", "snake_case", "words", "wrap"]
