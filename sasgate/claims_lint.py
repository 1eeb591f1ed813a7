"""The overclaim guard: find statements in prose that the decision does not allow.

`sasgate claims lint FILE...` checks papers, READMEs and posts against a decision (the
pipeline's decision.json, a bundle's, or a study record's). Every *finding* of the claim
catalogue has patterns here (a test keeps the two in step); a sentence is reported when it
matches a pattern of a claim the decision disallows, unless the match is

* inside quotation marks ("feature 3141 encodes refusal" as an example of what not to say),
* negated in its clause ("we cannot claim that ...", "without ... nothing ..."; a denial of a
  negation, "nobody can deny that ...", counts as affirmative),
* hedged as a question or hypothesis ("whether", "if", "could", "would", "future work"),
* disowned later in the sentence ("... is not supported", "... remains an open question").

It is a guard, not a proof: sentence-level patterns with measured precision and recall on
tests/claims_corpus.jsonl (README), tuned to flag rather than to miss.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .claims import FINDINGS
from .errors import ArtifactError

_I = re.IGNORECASE
_NEAR = r"[^.;:!?]{0,40}?"  # within the same clause, a few words on
_REFUSAL = r"\brefus\w*(?!\s+(?:rates?|scores?))"  # refusal the behaviour, not a refusal-rate column

_UNIT = r"\b(?:features?|latents?|neurons?|units?|circuits?|sae\s+(?:coordinates|directions|dimensions|basis))\b"
_REFUSAL_OR_HARM = r"\b(?:refus\w*|harm\w*|declin\w*|say(?:s|ing)?\s+no)"
_ANYTHING = r"\b(?:any|every|all|arbitrary|everyone's|other)\b"
_INPUTS = r"\b(?:prompts?|wordings?|phrasings?|paraphrases?|inputs?|requests?|models?|datasets?|distributions?|" \
          r"evaluation\s+sets?|languages?|settings?)\b"
_SAE = r"\b(?:saes?|dictionar(?:y|ies)|reconstructions?|autoencoders?)\b"
_FIT = r"\b(?:well|faithful\w*|negligible|accurate\w*|tight\w*|excellent\w*|high[- ]fidelity|low[- ]error|" \
       r"small\s+error|nearly\s+perfect\w*|close\s+to)\b"
_NEXT_PHASE = r"\b(?:phase|programme|program|stage|mechanism[- ]level|interpretability\s+work|circuit\s+work)\b"
_GO = r"\b(?:green-?lit|begin\w*|start\w*|authori[sz]\w*|approv\w*|unlock\w*|advanc\w*|enter\w*|launch\w*)\b"
# A clause that measures behaviour (steering moved a rate) is not a mechanism statement.
_BEHAVIOURAL = (r"\b(?:steer\w*|rates?|scores?|reduc\w*|rais(?:e|es|ed|ing)|lower(?:s|ed|ing)?|increas\w*|"
                r"induc\w*|restor\w*|bypass\w*|coefficients?|margin|DIM)\b")


@dataclass(frozen=True)
class Pattern:
    """A regex for one claim; `unless` (searched in the match's clause) vetoes it."""

    regex: re.Pattern[str]
    unless: re.Pattern[str] | None = None


def _compile(p: str | tuple[str, str]) -> Pattern:
    return Pattern(re.compile(p, _I)) if isinstance(p, str) else Pattern(re.compile(p[0], _I), re.compile(p[1], _I))


PATTERNS: dict[str, tuple[Pattern, ...]] = {k: tuple(_compile(p) for p in v) for k, v in {
    "behaviour-decision-valid": (
        r"\bdecision[- ]valid\b",
        r"\bbehaviou?r(?:al)?\s+gates?\s+(?:passed|succeeded|held)\b",
    ),
    "sas-matches-dim": (
        r"\bSAS\b[^.;!?]{0,60}?\b(?:match\w*|beat\w*|outperform\w*|rival\w*|on\s+par\s+with|equal\w*|"
        r"as\s+(?:well|good|effective\w*|strong\w*)\s+as|comparabl\w*)\b" + _NEAR + r"\bDIM\b",
    ),
    "sas-falls-short-of-dim": (
        r"\bSAS\b[^.;!?]{0,60}?\b(?:falls?\s+short\s+of|fell\s+short\s+of|underperform\w*|(?:is|was|were|are)\s+"
        r"(?:worse|weaker|less\s+effective)\s+than|lags?\s+behind|trails?)\b" + _NEAR + r"\bDIM\b",
        r"\bDIM\b[^.;!?]{0,40}?\b(?:outperform\w*|beat\w*|(?:is|was)\s+(?:better|stronger|more\s+effective)\s+than)\b"
        + _NEAR + r"\bSAS\b",
    ),
    "robustness-tested-families": (
        r"\b(?:robust\w*|stable|held|holds?)\s+(?:to|across|over|in)\s+(?:all\s+|every\s+|each\s+)?(?:the\s+)?"
        r"(?:\w+\s+){0,2}paraphrase\s+famil",
    ),
    "behaviour-stable-as-tested": (
        r"\b(?:stable|robust\w*|consistent\w*|held|holds?)\s+(?:across|over)\s+(?:the\s+)?(?:tested\s+|\w+\s+)?"
        r"(?:seeds|paraphrase)",
    ),
    "robustness-unconstrained": (
        r"\brobust\w*\s+(?:to|across|against|for|under|in)\s+(?:any|all|every|arbitrary|unseen|novel)\b",
        r"\b(?:generali[sz]\w*|transfer\w*|extend\w*|carr(?:y|ies|ied)\s+over)\s+(?:to|across|beyond)\s+(?:any|all|every|arbitrary|unseen|novel|new|other)\b",
        r"\b(?:regardless|irrespective|independent(?:ly)?)\s+of\b[^.;!?]{0,30}?(?:word|phras|prompt|paraphras)",
        r"\b(?:does\s+not|doesn't|do\s+not|don't)\s+matter\s+how\b",
        r"\bno\s+matter\s+(?:how|what|which)\b|\bwhatever\s+the\b|\bwhichever\b",
        r"\b(?:works?|holds?|applies|appl(?:y|ied))\s+(?:on|for|to|across)\s+(?:any|all|every|arbitrary)\b",
        r"\buniversal(?:ly)?\b",
        r"\bbeyond\s+the\s+tested\b",
        r"\b(?:independent|irrespective|regardless)\s+of\s+(?:the\s+)?" + r"[^.;!?]{0,20}?" + _INPUTS,
        # the general rule: a statement about all / any inputs in an affirmative clause
        (r"\b(?:work|hold|appl(?:y|ies)|transfer|generali[sz]e|succeed)\w*\b" + _NEAR + _ANYTHING + _NEAR + _INPUTS,
         r"\b(?:tested|evaluated|our\s+\w+\s+set)\b"),
    ),
    "reconstruction-adequate": (
        r"\breconstruction\s+(?:gate|test|check)\s+(?:was\s+|is\s+|has\s+been\s+)?(?:passed|succeeded|cleared)\b",
        r"\b(?:pass|passes|passed|meet|meets|met|clear|clears|cleared)\s+the\s+(?:reconstruction|nmse|0?\.12)\b",
        r"\b(?:faithful(?:ly)?|accurate(?:ly)?|adequate(?:ly)?|good|well)\b[^.;!?]{0,20}?\breconstruct",
        r"\b(?:nmse|reconstruction\s+error)\b[^.;!?]{0,20}?\b(?:within|below|under|beneath|at\s+or\s+below)\b",
        r"\b(?:saes?|reconstruct\w*)\b[^.;!?]{0,20}?\b(?:good|faithful|accurate|reliable|close)\s+enough\b",
        r"\breconstruct\w*\b" + _NEAR + r"\bwithin\s+the\s+(?:nmse\s+)?threshold\b",
        r"\b(?:sae|saes|sae\s+basis|basis|latents)\s+(?:is|are)\s+(?:now\s+)?validated\b",
        r"\breconstruction\s+(?:quality|error|fidelity|loss)\b[^.;!?]{0,20}?\b(?:sufficient|adequate|good|high|low|"
        r"acceptable|fine|excellent)\b",
        (_SAE + r"[^.;:!?]{0,60}?" + _FIT, r"\b(?:failed|above|exceed\w*|fall\s+short)\b"),
        r"\bexplain\w*\s+(?:more\s+than|over|at\s+least|above)\s+[\d.]+\s*%\s+of\s+the\s+variance\b",
    ),
    "mechanism-sas-features": (
        r"\b(?:encod(?:e|es|ed|ing)|represent(?:s|ed|ing)?|implement(?:s|ed|ing)?|underl(?:ie|ies|ying)|"
        r"underpin(?:s|ned|ning)?|detect(?:s|ed|ing)?|comput(?:e|es|ed|ing)|correspond(?:s|ed|ing)?\s+to|"
        r"stand(?:s)?\s+for|captur(?:e|es|ed|ing))\b" + _NEAR + _REFUSAL,
        _REFUSAL + r"\s+(?:is|are|was|were|gets)\s+(?:computed|encoded|represented|implemented|detected|decided)\b",
        r"\bmechanistic(?:ally)?\b(?!\s+interpretability)",
        r"\b(?:the|a|its)\s+(?:causal\s+|neural\s+|internal\s+)?mechanisms?\s+(?:of|by\s+which|behind|underlying|for|"
        r"that|through\s+which)\b",
        r"\b(?:features?|latents?|directions?|circuits?|units?)\s+(?:behind|underlying)\b" + _NEAR + r"\b(?:refus|harm)",
        r"\b(?:notion|concept|idea|sense)\s+of\s+(?:refusal|harm\w*)",
        r"\bwhere\s+(?:refusal|harm\w*)\s+(?:lives|happens|resides|is\s+(?:stored|computed|decided|encoded))\b",
        r"\b(?:isolat|pinpoint|locat|locali[sz]|decompos|disentangl)\w*\b" + _NEAR + r"\b(?:refus|harm)",
        r"\bhow\s+the\s+model\s+(?:knows|decides|detects|recogni[sz]es)\b",
        r"\b(?:refusal|harm\w*)\s+(?:features?|circuits?|neurons?|latents?|detectors?|directions?\s+in\s+the\s+sae)\b",
        r"\b(?:explain|reveal|uncover|identif|expos|elucidat)\w*\s+(?:how|why)\b[^.;!?]{0,60}?\brefus",
        r"\brepresentation\w*\s+of\s+(?:refusal|harm\w*)\b",
        r"\b(?:features?|latents?)\b[^.;!?]{0,30}?\b(?:uses?|relies\s+on|consults?)\s+to\b",
        # the general rule: an internal unit and refusal / harm in one affirmative, non-behavioural clause
        (_UNIT + r"[^.;:!?]{0,60}?" + _REFUSAL_OR_HARM, _BEHAVIOURAL),
        (_REFUSAL_OR_HARM + r"[^.;:!?]{0,60}?" + _UNIT, _BEHAVIOURAL),
    ),
    "causal-sas-features": (
        r"\bcausal(?:ly)?\b",
        r"\b(?:cause[sd]?|causing|mediat(?:e|es|ed|ing)|driv(?:e|es|en|ing)|drove|trigger(?:s|ed|ing)?|"
        r"responsible\s+for|necessary\s+for|sufficient\s+for)\b" + _NEAR + _REFUSAL,
        r"\b(?:is|are|was|were)\s+(?:the|a)\s+(?:root\s+)?causes?\b",
        r"\b(?:features?|latents?|units?)\b[^.;!?]{0,20}?\bcontrol\w*\s+(?:the\s+)?refus",
        r"\brefusal\s+(?:runs|depends|relies|rests|hinges)\s+on\b",
        r"\b(?:flows?|goes|passes|routed?)\s+through\b" + _NEAR + _UNIT,
        r"\b(?:runs|depends|relies|rests|hinges)\s+on\b" + _NEAR + r"\b(?:features?|latents?)\b",
        _REFUSAL + r"[^.;:!?]{0,30}?\b(?:is|are|was|were)\s+(?:caused|mediated|driven|triggered|controlled)\s+by\b",
    ),
    "phase-advance": (
        r"\b(?:advance[sd]?|advancing|move[sd]?|moving|proceed\w*|progress\w*|graduat\w*)\s+(?:on\s+)?(?:to|into)\s+"
        r"(?:the\s+|its\s+)?(?:next\s+phase|phase\s+\w+|mechanism\w*(?:[- ]level)?(?:\s+(?:work|phase|claims))?)\b",
        r"\bphase\s+movement\s+(?:is\s+|was\s+|has\s+been\s+)?(?:now\s+)?authori[sz]ed\b",
        r"\bphase\b[^.;!?]{0,40}?\b(?:is|was|has\s+been|are)\s+(?:now\s+)?(?:authori[sz]ed|unlocked|approved|open)\b",
        r"\b(?:path|gate|phase|unlock)\s+(?:is|was|has\s+been)\s+(?:now\s+)?(?:unlocked|passed|cleared)\b",
        r"\bmechanism(?:[- ]level)?\s+claims\s+(?:are|is|were|have\s+been)\s+(?:now\s+)?authori[sz]ed\b",
        r"\bpassed\s+(?:all|every)\s+(?:the\s+)?gates?\b",
        (_NEXT_PHASE + r"[^.;:!?]{0,60}?" + _GO, r"\b(?:once|until|when|after)\b"),
        (_GO + r"[^.;:!?]{0,40}?" + _NEXT_PHASE, r"\b(?:once|until|when|after)\b"),
        r"\b(?:cleared|authori[sz]ed|approved|green-?lit)\s+to\s+(?:start|begin|move|proceed|advance)\b",
        r"\b(?:unlock(?:s|ed)\s+(?:the\s+)?|unlocking\s+the\s+)(?:next\s+phase|phase\s+\w+|mechanism\w*(?:[- ]level)?|path|gate)\b",
        r"\b(?:gates?|gating\s+criteria|criteria|unlock\s+conditions?)\s+(?:are|is|were|have\s+been)\s+(?:all\s+)?"
        r"(?:satisfied|met|green|passed|cleared)\b",
        r"\b(?:mechanism\w*(?:[- ]level)?|circuits?|phase\s+\w+)\s+(?:work\s+|analysis\s+)?(?:can|may)\s+(?:now\s+)?"
        r"(?:begin|start|proceed|go\s+ahead)\b",
    ),
}.items()}

_NEGATORS = re.compile(
    r"\b(?:not(?!\s+(?:just|only|merely|simply))|no|never|cannot|nor|neither|none|nothing|nobody|without|"
    r"lacks?|lacking|refrain\w*|fail(?:s|ed)?\s+to|unable|rather\s+than|instead\s+of|\w+n't)\b", _I)
_DENIALS = re.compile(r"\b(?:den(?:y|ies|ied)|doubt\w*|dispute\w*)\b", _I)
_HEDGES = re.compile(r"\b(?:whether|if|once|until|unless|could|would|might|hypothes\w*|conjectur\w*|speculat\w*|"
                     r"future\s+work|(?:a|any)\s+(?:new|future|later)\b)", _I)
_FALSE_VALUE = re.compile(r"^\s*[:=]\s*[`*_\"]*(?:false|no|none)\b", _I)  # "phase movement authorized: `false`"
# Sections that list what may not be claimed (CLAIMS.md's "We cannot claim") quote claims, not make them.
_DISOWNING_HEADING = re.compile(r"^(#{1,6})\s+.*\b(?:cannot|can't|do\s+not|don't|may\s+not)\s+claim|"
                                r"^(#{1,6})\s+.*\b(?:disallowed|withheld|overclaims?|not\s+claimed)\b", _I | re.M)
_HEADING = re.compile(r"^(#{1,6})\s", re.M)
_DISOWNED = re.compile(
    r"\b(?:is|are|was|were|remains?|be)\s+(?:not|un\w+|an\s+open|open|withheld|disallowed|beyond)\b|"
    r"\bcannot\s+be\b|\bwould\s+(?:need|require)\b|\b(?:disallowed|withheld|forbidden|not\s+allowed)\b|\boverclaim\w*|\bgoes\s+beyond\b|\bnot\s+(?:supported|established|shown|claimed|tested|"
    r"evaluated|authori[sz]ed)\b", _I)
_CLAUSE_BREAK = re.compile(r"[;:—–]|\s-\s|,\s*(?:but|whereas|while|although|though|yet)\b|\bhowever\b", _I)
_QUOTES = re.compile(r"\"[^\"\n]*\"|“[^”]*”|‘[^’]*’|«[^»]*»|`[^`\n]*`|(?<![\w'])'[^'\n]+'(?![\w'])")
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)\]]*\s+|\n\s*\n|\n(?=\s*(?:[#>|*+-]|\d+[.)])\s)|\|")


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    claim: str
    match: str
    sentence: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: overclaim [{self.claim}] {self.match!r} in: {self.sentence}"


def _blank(text: str, pattern: re.Pattern[str]) -> str:
    """Replace matches by spaces, keeping newlines, so offsets and line numbers stay true."""
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _blank_disowning_sections(text: str) -> str:
    """Blank every markdown section whose heading says it lists claims not made, up to the next
    heading of the same or a higher level."""
    for h in list(_DISOWNING_HEADING.finditer(text)):
        level = len(h.group(1) or h.group(2))
        end = next((m.start() for m in _HEADING.finditer(text, h.end()) if len(m.group(1)) <= level), len(text))
        text = text[:h.start()] + re.sub(r"[^\n]", " ", text[h.start():end]) + text[end:]
    return text


def sentences(text: str) -> Iterator[tuple[int, str]]:
    """(start offset, sentence) for the prose in text; code fences and HTML comments are skipped."""
    prose = _blank_disowning_sections(_blank(_blank(text, _FENCE), _COMMENT))
    start = 0
    for m in _SENTENCE_END.finditer(prose):
        if prose[start:m.start()].strip():
            yield start, prose[start:m.start()]
        start = m.end()
    if prose[start:].strip():
        yield start, prose[start:]


def _negated(before: str) -> bool:
    negators, denials = len(_NEGATORS.findall(before)), len(_DENIALS.findall(before))
    return (negators > 0 and denials == 0) or (negators + denials) % 2 == 1


def _clause(sentence: str, start: int, end: int) -> str:
    breaks = [b.end() for b in _CLAUSE_BREAK.finditer(sentence, 0, start)]
    nxt = _CLAUSE_BREAK.search(sentence, end)
    return sentence[breaks[-1] if breaks else 0:nxt.start() if nxt else len(sentence)]


def _vetoed(pattern: Pattern, sentence: str, m: re.Match[str]) -> bool:
    """A general (co-occurrence) rule also yields to a negation or hedge between its two ends."""
    if pattern.unless is None:
        return False
    span = m.group(0)
    return bool(pattern.unless.search(_clause(sentence, m.start(), m.end()))) or _negated(span) or bool(
        _HEDGES.search(span))


def suppressed(sentence: str, start: int, end: int) -> bool:
    """Whether a match at [start, end) of sentence is quoted, negated, hedged or disowned."""
    if any(q.start() <= start and end <= q.end() for q in _QUOTES.finditer(sentence)):
        return True
    breaks = [b.end() for b in _CLAUSE_BREAK.finditer(sentence, 0, start)]
    clause = sentence[breaks[-1] if breaks else 0:start]
    if _negated(clause) or _HEDGES.search(clause):
        return True
    after = sentence[end:]
    if _FALSE_VALUE.match(after):
        return True
    nxt = _CLAUSE_BREAK.search(after)
    return bool(_DISOWNED.search(after[: nxt.start()] if nxt else after))


def lint_text(text: str, disallowed: Iterable[str], file: str = "<text>") -> list[Finding]:
    """Every overclaim of a disallowed finding in text: one Finding per (sentence, claim)."""
    ids = [c for c in FINDINGS if c in set(disallowed)]
    out: list[Finding] = []
    for offset, sentence in sentences(text):
        if sentence.rstrip().endswith("?"):
            continue  # a question claims nothing
        for claim in ids:
            for pattern in PATTERNS[claim]:
                hit = next((m for m in pattern.regex.finditer(sentence)
                            if not suppressed(sentence, m.start(), m.end()) and not _vetoed(pattern, sentence, m)),
                           None)
                if hit is not None:
                    line = text.count("\n", 0, offset + hit.start()) + 1
                    out.append(Finding(file, line, claim, hit.group(0), " ".join(sentence.split())))
                    break
    return out


def lint_files(files: Iterable[str | Path], disallowed: Iterable[str]) -> list[Finding]:
    ids = list(disallowed)
    out: list[Finding] = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ArtifactError(f"no such file to lint: {f}") from None
        except UnicodeDecodeError:
            raise ArtifactError(f"{f}: not UTF-8 text") from None
        out += lint_text(text, ids, str(f))
    return out
