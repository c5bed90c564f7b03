"""The tokenizer and template pass: what a conversion can break outside the weights, where no
logit comparison sees it (the shadow feeds the candidate's own token ids to both sides).

Compared, candidate against reference: the vocabulary and its ids, the added/special tokens,
BOS/EOS/PAD as generation_config.json and the tokenizer give them (config.json's own are the
config pass's), the chat's end-of-turn token against the stop set, and the chat template
rendered on a fixed conversation (text and ids). `read_tokenizer_facts` does the I/O (never
raises); `diff_tokenizers` is pure.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters.diagnose.configs import ConfigDifference
from adapters.model_dir import is_model_dir, read_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
SYSTEM = "You are Quill, a terse assistant for lighthouse keepers."
ANSWER = "The lamp is lit at dusk."
CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When is the lamp lit?"},
                {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "And put out?"}]
ROLES = ("bos", "eos", "pad")
SHOWN = 3  # examples named per kind of difference


@dataclass
class TokenizerFacts:
    config: dict = field(default_factory=dict)  # bos/eos/pad_token_id from config.json
    generation: dict | None = None  # the same from generation_config.json; None: no such file
    error: str | None = None  # why the tokenizer was not loaded (None: loaded, or no tokenizer files)
    has_files: bool = True
    vocab: dict[str, int] = field(default_factory=dict)  # get_vocab(): base and added tokens
    added: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (content, special)
    specials: dict[str, tuple[str, int | None] | None] = field(default_factory=dict)  # bos/eos/pad -> (text, id)
    has_template: bool = False
    rendering: str | None = None  # CONVERSATION with the generation prompt (None: no template, or it raised)
    render_error: str | None = None
    rendering_ids: list[int] = field(default_factory=list)  # the rendering, by this side's tokenizer
    generation_prompt: str | None = None  # what add_generation_prompt appends
    end_of_turn: tuple[str, int] | None = None  # the token right after an assistant message

    @property
    def loaded(self) -> bool:
        return self.has_files and self.error is None


@contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    level, disabled = hf_logging.get_verbosity(), logging.root.manager.disable
    hf_logging.set_verbosity_error()
    logging.disable(max(disabled, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        hf_logging.set_verbosity(level)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _render(tok, messages: list[dict], prompt: bool = True) -> tuple[str | None, str | None]:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt), None
    except Exception as e:  # noqa: BLE001 (a template may raise anything: raise_exception, undefined names)
        return None, f"{type(e).__name__}: {e}"


def read_tokenizer_facts(model_dir: Path) -> TokenizerFacts:
    model_dir = Path(model_dir)
    ids = lambda d: None if d is None else {f"{r}_token_id": d.get(f"{r}_token_id") for r in ROLES}
    facts = TokenizerFacts(config=ids(read_config(model_dir) if is_model_dir(model_dir) else None) or {},
                           generation=ids(_json(model_dir / "generation_config.json")))
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        facts.has_files, facts.error = False, "no tokenizer files"
        return facts
    with _quiet():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 (any failure to load: reported, never raised)
            text = str(e)
            facts.error = ("it needs remote code (trust_remote_code), which diagnose does not run"
                           if "trust_remote_code" in text else f"{type(e).__name__}: {text.splitlines()[0][:200]}")
            return facts
        facts.vocab = tok.get_vocab()
        facts.added = {i: (str(t.content), bool(t.special)) for i, t in tok.added_tokens_decoder.items()}
        facts.specials = {r: None if getattr(tok, f"{r}_token") is None
                          else (str(getattr(tok, f"{r}_token")), getattr(tok, f"{r}_token_id")) for r in ROLES}
        facts.has_template = bool(tok.chat_template)
        if not facts.has_template:
            return facts
        facts.rendering, facts.render_error = _render(tok, CONVERSATION)
        if facts.rendering is not None:
            facts.rendering_ids = tok(facts.rendering, add_special_tokens=False)["input_ids"]
            bare, _ = _render(tok, CONVERSATION, prompt=False)
            if bare is not None and facts.rendering.startswith(bare):
                facts.generation_prompt = facts.rendering[len(bare):]
        turn = facts.rendering or _render(tok, CONVERSATION[1:])[0]  # a template may refuse system turns
        if turn is not None and ANSWER in turn:
            after = tok(turn[turn.index(ANSWER) + len(ANSWER):], add_special_tokens=False)["input_ids"]
            if after:
                facts.end_of_turn = (tok.convert_ids_to_tokens(after[0]), after[0])
    return facts


def _names(vocab: dict[str, int]) -> dict[int, str]:
    return {i: t for t, i in vocab.items()}


def _id(value, names: dict[int, str]) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_id(v, names) for v in value) + "]"
    return f"{value} ({names[value]!r})" if value in names else str(value)


def _stop_ids(facts: TokenizerFacts) -> set[int]:
    value = (facts.generation or facts.config).get("eos_token_id")
    return set(value) if isinstance(value, list) else set() if value is None else {value}


def _some(items, fmt) -> str:
    items = list(items)
    return ", ".join(fmt(x) for x in items[:SHOWN]) + (", …" if len(items) > SHOWN else "")


def _vocab(cand: TokenizerFacts, ref: TokenizerFacts) -> list[ConfigDifference]:
    """The base vocabulary (added tokens are the next check's)."""
    added = {t for t, _ in cand.added.values()} | {t for t, _ in ref.added.values()}
    c = {t: i for t, i in cand.vocab.items() if t not in added}
    r = {t: i for t, i in ref.vocab.items() if t not in added}
    only_c, only_r = [t for t in c if t not in r], [t for t in r if t not in c]
    moved = sorted((t for t in c if t in r and c[t] != r[t]), key=r.get)
    if not (only_c or only_r or moved):
        return []
    side = lambda n, only: f"{n} tokens" + (f"; {len(only)} only here: {_some(only, repr)}" if only else "")
    if moved:
        examples = _some(moved, lambda t: f"{t!r}: {r[t]} → {c[t]}")
        what = (f"{len(moved)} tokens at other ids, reference → candidate: {examples}; "
                f"{'the ids moved' if not (only_c or only_r) else 'the same text becomes different ids'}: "
                "the embedding rows the model reads are not the ones it was trained with")
    else:
        what = "text with these tokens is split differently, and the model never saw tokens added on one side"
    return [ConfigDifference(field="vocab", candidate=side(len(cand.vocab), only_c),
                             reference=side(len(ref.vocab), only_r), consequence=what, forward=True, file="tokenizer")]


def _added(cand: TokenizerFacts, ref: TokenizerFacts) -> list[ConfigDifference]:
    c = {t: (i, s) for i, (t, s) in cand.added.items()}
    r = {t: (i, s) for i, (t, s) in ref.added.items()}
    changed = sorted({t for t in c.keys() ^ r.keys()} | {t for t in c.keys() & r.keys() if c[t][0] != r[t][0]},
                     key=lambda t: r.get(t, c.get(t))[0])
    flags = [t for t in c.keys() & r.keys() if c[t][1] != r[t][1]]
    side = lambda d, ts: _some(ts, lambda t: f"{t!r} {d[t][0] if t in d else 'absent'}")
    out = []
    if changed:
        out.append(ConfigDifference(
            field="added_tokens", candidate=side(c, changed), reference=side(r, changed), forward=True,
            file="tokenizer", consequence="special/added tokens added, removed or at other ids: prompts that contain "
            "them reach the model as other tokens' embeddings"))
    if flags:
        flag = lambda d: _some(sorted(flags), lambda t: f"{t!r} {'special' if d[t][1] else 'not special'}")
        out.append(ConfigDifference(
            field="added_tokens.special", candidate=flag(c), reference=flag(r), forward=False, file="tokenizer",
            consequence="skip_special_tokens drops different tokens from the text users see"))
    return out


def _template(cand: TokenizerFacts, ref: TokenizerFacts) -> list[ConfigDifference]:
    def shown(f: TokenizerFacts, at: int = 0) -> str:
        if not f.has_template:
            return "no chat template"
        if f.rendering is None:
            return f"raised {f.render_error}"
        return repr(f.rendering[max(0, at - 12):at + 36])

    diff = lambda what, forward=True, name="chat_template", c=None, r=None: ConfigDifference(
        field=name, candidate=c or shown(cand), reference=r or shown(ref), consequence=what, forward=forward,
        file="chat template")
    if not cand.has_template and not ref.has_template:
        return []
    if not (cand.has_template and ref.has_template):
        who = "candidate" if not cand.has_template else "reference"
        return [diff(f"the {who} has no chat template: chat requests fail or are prompted in a format the model was "
                     "not trained on")]
    if cand.rendering is None or ref.rendering is None:
        if cand.render_error == ref.render_error:
            return []
        who = "candidate" if cand.rendering is None else "reference"
        return [diff(f"the {who}'s template raises on a conversation the other renders (system, user, assistant, "
                     "user): such chat requests fail")]
    if cand.rendering != ref.rendering:
        at = next((i for i, (a, b) in enumerate(zip(cand.rendering, ref.rendering)) if a != b),
                  min(len(cand.rendering), len(ref.rendering)))
        if SYSTEM in ref.rendering and SYSTEM not in cand.rendering:
            what = "the candidate's template drops the system turn: the system prompt never reaches the model"
        elif ref.generation_prompt and not cand.generation_prompt:
            what = (f"the candidate's template does not add the generation prompt {ref.generation_prompt!r}: the model "
                    "is not cued to answer")
        else:
            what = "the model is prompted in a format it was not trained on"
        return [diff(what, c=f"at character {at}: {shown(cand, at)}", r=f"at character {at}: {shown(ref, at)}")]
    if cand.rendering_ids != ref.rendering_ids:
        c, r = cand.rendering_ids, ref.rendering_ids
        at = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        tok = lambda ids, f: _id(ids[at], _names(f.vocab)) if at < len(ids) else "end"
        return [diff("the same rendered prompt becomes different token ids: the model reads other embeddings",
                     name="chat_template.ids", c=f"token {at}: {tok(c, cand)}", r=f"token {at}: {tok(r, ref)}")]
    return []


def _end_of_turn(cand: TokenizerFacts, ref: TokenizerFacts, names: dict[int, str]) -> str | None:
    """The consequence when the candidate's stop set lacks the chat's end-of-turn token and the reference's has it."""
    if ref.end_of_turn is None or ref.end_of_turn[1] not in _stop_ids(ref):
        return None
    text = ref.end_of_turn[0]
    wanted = cand.vocab.get(text, ref.end_of_turn[1]) if cand.loaded else ref.end_of_turn[1]
    if wanted in _stop_ids(cand):
        return None
    eos = cand.specials.get("eos")
    source = "generation_config.json's" if cand.generation is not None else "config.json's (no generation_config.json)"
    if eos is not None and eos[1] == wanted:
        return (f"transformers' generate() runs past the end of the turn: it stops on {source} eos_token_id only, "
                f"which lacks the chat's end-of-turn token {text!r} (vLLM and shadowserve also stop on the "
                f"tokenizer's EOS {_id(wanted, names)}, so they stop)")
    return (f"generation runs past the end of the turn: the chat's end-of-turn token {text!r} is neither in {source} "
            "eos_token_id nor the tokenizer's EOS, the tokens vLLM, transformers and shadowserve stop on")


SOURCE_CONSEQUENCES = {
    "bos": ("a different beginning-of-sequence token: prompts begin differently where it is added", True),
    "eos": ("a different end-of-sequence token: generation stops elsewhere", True),
    "pad": ("a different padding token (batched inputs, loss masks)", False),
}


def _sources(cand: TokenizerFacts, ref: TokenizerFacts) -> list[ConfigDifference]:
    cn, rn = _names(cand.vocab), _names(ref.vocab)
    out = []
    if cand.generation is not None or ref.generation is not None:  # both absent: the config pass's comparison
        c, r = cand.generation or cand.config, ref.generation or ref.config
        for role in ROLES:
            key = f"{role}_token_id"
            a, b = (sorted(v) if isinstance(v, list) else v for v in (c.get(key), r.get(key)))
            if a != b:
                what, forward = SOURCE_CONSEQUENCES[role]
                if role == "bos":
                    what, forward = "a different bos_token_id for generation (used when the prompt is empty)", False
                out.append(ConfigDifference(field=f"generation_config.{key}", candidate=_id(c.get(key), cn),
                                            reference=_id(r.get(key), rn), consequence=what, forward=forward,
                                            file="generation_config.json"))
    if cand.loaded and ref.loaded:
        for role in ROLES:
            a, b = cand.specials.get(role), ref.specials.get(role)
            if a != b:
                what, forward = SOURCE_CONSEQUENCES[role]
                if role == "eos":
                    what = "the tokenizer's end-of-sequence token differs: vLLM and shadowserve stop on it"
                show = lambda s: "none" if s is None else f"{s[1]} ({s[0]!r})"
                out.append(ConfigDifference(field=f"tokenizer.{role}_token", candidate=show(a), reference=show(b),
                                            consequence=what, forward=forward, file="tokenizer"))
    return out


def diff_tokenizers(candidate: TokenizerFacts, reference: TokenizerFacts) -> list[ConfigDifference]:
    """Causes first: the ids (vocabulary, added tokens), then the stop token, the template, the
    per-source token ids, and last what could not be compared."""
    both = candidate.loaded and reference.loaded
    ids = _vocab(candidate, reference) + _added(candidate, reference) if both else []
    template = _template(candidate, reference) if both else []
    sources = _sources(candidate, reference)
    stop = []
    if reference.loaded and (consequence := _end_of_turn(candidate, reference, _names(candidate.vocab))):
        eos = next((d for d in sources if d.field == "generation_config.eos_token_id"), None)
        if eos is not None:  # one line, not two
            sources.remove(eos)
            stop = [eos.model_copy(update={"consequence": consequence, "forward": True})]
        else:
            stop = [ConfigDifference(
                field="end_of_turn", file="generation_config.json", consequence=consequence, forward=True,
                candidate=f"stops on {_id(sorted(_stop_ids(candidate)), _names(candidate.vocab))}",
                reference=f"stops on {_id(sorted(_stop_ids(reference)), _names(reference.vocab))}")]
    skipped = []
    if not both and (candidate.has_files or reference.has_files):
        reason = "; ".join(f"{who}: {f.error}" for who, f in (("candidate", candidate), ("reference", reference))
                           if not f.loaded)
        skipped = [ConfigDifference(field="tokenizer", candidate="loaded" if candidate.loaded else candidate.error,
                                    reference="loaded" if reference.loaded else reference.error, forward=False,
                                    consequence=f"tokenizer not compared: {reason}", file="tokenizer")]
    return ids + stop + template + sources + skipped


def tokenizer_pass(candidate: Path, reference: Path) -> list[ConfigDifference]:
    """The differences; a failure of the pass itself (a template engine error past the
    guarded calls, an unreadable JSON file) is one informational line, never the end of
    diagnose's other passes."""
    try:
        return diff_tokenizers(read_tokenizer_facts(candidate), read_tokenizer_facts(reference))
    except Exception as exc:  # noqa: BLE001 (reported, not raised: the weights still get compared)
        return [ConfigDifference(field="tokenizer", candidate="?", reference="?", forward=False, file="tokenizer",
                                 consequence=f"tokenizer not compared: {type(exc).__name__}: {exc}")]
