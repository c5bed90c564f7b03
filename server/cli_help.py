"""How `shadowserve <command> --help` is laid out: positional arguments, then the options a
user needs first, then the rest in groups (the shadow path, comparison, the verdict's tuning, engine
and memory, limits, mounted LoRA adapters, vLLM pass-through). The same groups and order
make the generated command-line reference (docs/gen_reference.py).

pydantic-settings builds the argparse parsers from the settings models; `HelpLayout` is
the `add_argument_method` it calls for every flag, and files each flag by its field."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel

MAIN = "options"
# Group titles in the order they print, after the main options.
GROUPS = (
    "shadow path",
    "comparison",
    "verdict tuning",
    "engine and memory",
    "limits and lifecycle",
    "mounted LoRA adapters (vLLM)",
    "vLLM pass-through",
)
# Options a newcomer reaches for first, in this order, per laid-out command.
FIRST: Mapping[str, tuple[str, ...]] = {
    "serve": ("model", "host", "port", "dtype", "engine", "served_model_name", "api_keys", "shadow_rate",
              "shadow_reference_model", "shadow_reference_adapter", "shadow_reference_url", "shadow_capture_path"),
    "verify": ("adapter", "candidate_adapter", "prompts", "corpus", "samples", "max_tokens", "json_report", "html",
               "strict", "check_weights", "calibrate", "engine", "dtype"),
    "reference": ("model", "adapter", "name", "host", "port", "device", "noise_dtype"),
}
# Group by the class that declares the field (mixins shared by several commands) ...
BY_CLASS = {
    "LoraOptions": "mounted LoRA adapters (vLLM)",
    "VllmOptions": "vLLM pass-through",
    "ShadowSettings": "shadow path",
    "VerdictSettings": "verdict tuning",
}
# ... else by name.
ENGINE = frozenset({"max_model_len", "max_logprobs", "enforce_eager", "kv_cache_gib", "gpu_memory_utilization",
                    "seed", "trust_remote_code", "reference_device", "reference_max_memory", "max_memory"})
COMPARISON = frozenset({"context", "top_k", "near_tie_margin"})
LIFECYCLE = frozenset({"shutdown_grace_s", "start_timeout_s", "docs", "log_level", "tokens"})


def group_of(command: str, model: type[BaseModel], name: str) -> str:
    """The help group of `model`'s field `name` (a field name, not an alias) under `command`."""
    if name in FIRST.get(command, ()):
        return MAIN
    owner = next(c.__name__ for c in model.__mro__ if name in vars(c).get("__annotations__", {}))
    if owner in BY_CLASS:
        return BY_CLASS[owner]
    if name.startswith("verdict_"):
        return "verdict tuning"
    if name in COMPARISON:
        return "comparison"
    if name in ENGINE:
        return "engine and memory"
    if name.startswith("max_") or name in LIFECYCLE:
        return "limits and lifecycle"
    return MAIN


def field_name(model: type[BaseModel], dest: str) -> str:
    """A flag's field: argparse's dest is the alias where there is one (--json: json_report)."""
    return next((n for n, f in model.model_fields.items() if f.alias == dest), dest)


def one_default(text: str) -> str:
    """pydantic-settings appends "(default: ...)" or "(default factory: list)" to every
    flag's help: an empty list or mapping reads "(default: none)", and a description that
    already says its default keeps only its own."""
    text = re.sub(r"\(default factory: (?:list|dict)\)", "(default: none)", text)
    own, appended = text.find("(default:"), text.rfind(" (default:")
    return text[:appended] if own != -1 and appended >= 0 and own < appended else text


def rank(command: str, name: str) -> int:
    first = FIRST.get(command, ())
    return first.index(name) if name in first else len(first)


@dataclass
class HelpLayout:
    """`add_argument_method` for pydantic-settings' CliSettingsSource. `commands` maps a
    command ("serve", "verify") to its settings model; other commands keep argparse's layout."""

    commands: Mapping[str, type[BaseModel]]
    _groups: dict[int, dict[str, argparse._ArgumentGroup]] = field(default_factory=dict)

    def add_argument(self, container, *names: str, **kwargs) -> argparse.Action:
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = one_default(kwargs["help"])
        parser = container if isinstance(container, argparse.ArgumentParser) else None
        command = parser.prog.partition(" ")[2] if parser is not None else ""
        if command not in self.commands or not names[0].startswith("-"):
            return container.add_argument(*names, **kwargs)
        name = field_name(self.commands[command], kwargs["dest"].rpartition(".")[2])
        title = group_of(command, self.commands[command], name)
        if title == MAIN:
            action = parser.add_argument(*names, **kwargs)
            first = parser._optionals._group_actions  # the help action stays on top
            model = self.commands[command]
            first.sort(key=lambda a: -1 if a.dest == "help" else rank(command, field_name(model, a.dest.rpartition(".")[2])))
            return action
        groups = self._groups.setdefault(id(parser), {t: parser.add_argument_group(t) for t in GROUPS})
        return groups[title].add_argument(*names, **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Usage as `shadowserve verify [options] CANDIDATE REFERENCE`: the positionals a user
    must give, not a wall of every optional flag before them."""

    def add_usage(self, usage, actions, groups, prefix=None):
        if usage is None and any(a.option_strings for a in actions):
            positionals = [self._format_args(a, a.dest.upper()) for a in actions if not a.option_strings]
            usage = " ".join(["%(prog)s", "[options]", *positionals])
        super().add_usage(usage, actions, groups, prefix)
