import re
import unicodedata

_NON_WORD = re.compile(r"[^a-z0-9]+")


def slugify(text: str, separator: str = "-", max_length: int | None = None) -> str:
    """'Crème Brûlée, 2 ways!' -> 'creme-brulee-2-ways'.

    Accented letters are transliterated to ASCII, every other run of symbols becomes one separator, and a
    slug cut to ``max_length`` never ends with a separator.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _NON_WORD.sub(separator, ascii_text.lower()).strip(separator)
    if max_length is not None and len(slug) > max_length:
        slug = slug[:max_length].rstrip(separator)
    return slug
