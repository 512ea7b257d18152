"""Where a long text may be cut into pieces without changing its tokens: the proof for GPT-2's regex
(below), and the Cutter that finds such places (checking each cut for tokenizers without a proof)."""
from __future__ import annotations

import re
import unicodedata

import numpy as np

from .engines import byte_level_regex_reason

VERIFY_WINDOW = 512           # characters each side of a cut checked for tokenizers without a proof

# Safe cuts
#
# A long text is tokenized in pieces, so each cut must give exactly the tokens the whole text
# gives. The rule: cut at p (the right piece starts with text[p]) when text[p] is a space or
# a newline and text[p+1] is not whitespace, i.e. before the last whitespace character of a
# whitespace run that is followed by a visible character.
#
# Why that is safe for GPT-2's byte-level regex (GPT2_PATTERN): let W be that run and X the
# visible character after it. In the whole text, `\s+(?!\S)` matches W minus its last
# character (backtracking one step so the lookahead sees whitespace), then the last
# character is either glued to X (a space: ` ?\p{L}+` etc.) or matched alone by `\s+`.
# So p is a pre-token boundary. Cut there, the left piece ends with W minus its last
# character, which `\s+(?!\S)` matches whole at the end of the string (the lookahead
# succeeds at the end), and everything before it was matched without looking past it
# (letter/number/punctuation runs stop at whitespace; the regex never looks back). The
# right piece starts with the same last character + X as before. Pre-tokens are therefore
# identical and BPE sees them one by one.
#
# What is *not* safe, and why the rule is this narrow: cutting right after a newline that
# follows other whitespace (" \nX" cut before X gives " \n" as one pre-token instead of
# " " + "\n"), or after a space that precedes a letter (" X" is one pre-token).
# Python's str.isspace() is a superset of the regex's \s (checked over all of Unicode), so
# "not isspace" reliably means \S to the regex.
#
# Added tokens (GPT-2's "<|endoftext|>") are split off before the regex runs, so the text in
# front of one ends like a string does: "\n\n<|endoftext|>" gives the pre-token "\n\n", while a
# cut before the second newline gives "\n" + "\n". Hence no cut right before a character that
# can start an added token.
#
# Text without whitespace (a one-line JSON blob, CJK text, base64) gets a second rule: cut at p
# when text[p-1] and text[p] are both visible and belong to different classes of the regex,
# letter (\p{L}), number (\p{N}) or other (neither, nor whitespace), text[p-1] is not an
# apostrophe, and no added token occurs across p.
#
# Why that is safe: every alternative of GPT2_PATTERN that can match a visible character is a
# contraction ('s 't 're 've 'm 'll 'd) or a run of one class with an optional leading space.
# A run of text[p-1]'s class stops before text[p]; a contraction holds two classes only as an
# apostrophe followed by a letter, which is excluded. So the pre-token holding text[p-1] ends
# at p. The left piece is matched as before: each match in it ended at a character of a
# different class (or at p) and is found again when the string ends at p; no alternative that
# failed before can succeed now (contractions are fixed strings; the one lookahead,
# `\s+(?!\S)`, sees the same visible character before p). The right piece is matched from p
# exactly as the whole text is, since the regex never looks back. An added token across p
# would be broken in two; one that ends or starts at p splits the text there anyway.
#
# Python's Unicode tables can be older than the regex engine's: a code point Python does not
# know (category Cn) may be a letter to the regex, so no cut touches one. Whitespace cuts come
# first; this rule is used only where no whitespace cut lies within WHITESPACE_REACH characters.
#
# Other tokenizers (normalizers, Metaspace, other regexes) get the same candidate cuts but
# each cut is checked: tokens of a window around it must equal the tokens of its two halves.
# That check is local, not a proof: in a word longer than the window (text without any
# whitespace, for a pre-tokenizer that splits only at spaces) it sees the window only.
#
# A text with neither (one letter repeated, a DNA sequence on one line) is one pre-token and
# has no safe cut at all: it is held whole, and a validation range inside it cannot be placed.

WHITESPACE_REACH = 256
CHANGE_CANDIDATES = re.compile(r"\b|(?<=\d)(?=[^\W\d_])|(?<=[^\W\d_])(?=\d)")  # a superset, mostly


def regex_class(ch: str) -> str | None:
    """GPT2_PATTERN's class of a visible character: "L", "N" or "P" (other); None for whitespace
    and for code points Python's Unicode tables do not know."""
    category = unicodedata.category(ch)
    if ch.isspace() or category in ("Cn", "Cs"):
        return None
    return category[0] if category[0] in "LN" else "P"


class Cutter:
    """Finds cut positions that cannot change the tokens."""

    def __init__(self, verify=None, added=()):
        self.verify = verify  # encode(text) -> ids, for tokenizers without a proof of the rules
        self.added = tuple(t for t in added if t)  # added tokens: never cut across one
        self.avoid = frozenset(t[0] for t in self.added)  # ... nor right before one after whitespace
        self.reach = max([2, *map(len, self.added)])  # is_safe looks at most this far past p

    def is_safe(self, text: str, p: int) -> bool:
        if not self.is_candidate(text, p):
            return False
        if self.verify is None:
            return True
        left, right = text[max(0, p - VERIFY_WINDOW):p], text[p:p + VERIFY_WINDOW]
        whole = self.verify(left + right)
        return np.array_equal(whole, np.concatenate([self.verify(left), self.verify(right)]))

    def is_candidate(self, text: str, p: int) -> bool:
        """One of the two rules holds at p (see "Safe cuts"); text must go `reach` characters past p."""
        if not 0 < p <= len(text) - self.reach:
            return False
        if text[p] in " \n":
            return not text[p + 1].isspace() and text[p + 1] not in self.avoid
        a, b = regex_class(text[p - 1]), regex_class(text[p])
        if a is None or b is None or a == b or text[p - 1] == "'":
            return False
        return not any(text.find(t, max(0, p - len(t) + 1), p + len(t) - 1) >= 0 for t in self.added)

    def last(self, text: str, lo: int, hi: int) -> int | None:
        """The largest safe cut in [lo, hi): at whitespace, else at a change of class close to hi."""
        cut = self.last_at_whitespace(text, lo, hi)
        if cut is None or hi - cut > WHITESPACE_REACH:
            near = self.last_at_change(text, lo if cut is None else cut + 1, hi)
            cut = near if near is not None else cut
        return cut

    def first(self, text: str, lo: int, hi: int) -> int | None:
        """The smallest safe cut in [lo, hi): at whitespace, else at a change of class close to lo."""
        cut = self.first_at_whitespace(text, lo, hi)
        end = hi if cut is None else cut
        if end - lo > WHITESPACE_REACH:
            near = self.first_at_change(text, lo, end)
            cut = near if near is not None else cut
        return cut

    def last_at_whitespace(self, text: str, lo: int, hi: int) -> int | None:
        space, newline = text.rfind(" ", lo, hi), text.rfind("\n", lo, hi)
        while max(space, newline) >= max(lo, 1):
            p = max(space, newline)
            if self.is_safe(text, p):
                return p
            if p == space:
                space = text.rfind(" ", lo, p)
            else:
                newline = text.rfind("\n", lo, p)
        return None

    def first_at_whitespace(self, text: str, lo: int, hi: int) -> int | None:
        lo = max(lo, 1)
        space, newline = text.find(" ", lo, hi), text.find("\n", lo, hi)
        while space >= 0 or newline >= 0:
            p = min(x for x in (space, newline) if x >= 0)
            if self.is_safe(text, p):
                return p
            if p == space:
                space = text.find(" ", p + 1, hi)
            else:
                newline = text.find("\n", p + 1, hi)
        return None

    def first_at_change(self, text: str, lo: int, hi: int) -> int | None:
        for match in CHANGE_CANDIDATES.finditer(text, max(lo, 1), hi):
            p = match.start()
            if p < hi and text[p] not in " \n" and self.is_safe(text, p):
                return p
        return None

    def last_at_change(self, text: str, lo: int, hi: int) -> int | None:
        window = 1024
        while hi > lo:  # backwards in growing windows: the regex only searches forwards
            start = max(lo, hi - window)
            found = [m.start() for m in CHANGE_CANDIDATES.finditer(text, max(start, 1), hi) if m.start() < hi]
            for p in reversed(found):
                if text[p] not in " \n" and self.is_safe(text, p):
                    return p
            hi, window = start, 4 * window
        return None


def make_cutter(tokenizer, spec: dict | None, engine) -> Cutter:
    """The GPT-2 rule as is where it is proven for this tokenizer, else with every cut verified."""
    proven = not byte_level_regex_reason(spec)
    return Cutter(None if proven else engine.encode, added=tokenizer.get_added_vocab())


