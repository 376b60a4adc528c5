"""`ragpt prompts ...`: review, approve, activate, roll back, diff, export and import soft prompts.

A thin layer over `ragpt.softprompts.registry.PromptRegistry`; the registry root is settings.prompt_dir.
Every state change is recorded in the registry's audit log with --actor (default: the OS user).
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ragpt.cli.common import fail, settings_from_ctx
from ragpt.errors import RagptError

prompts_app = typer.Typer(
    help="Soft-prompt registry: list, show, log, approve, activate, roll back, diff, export, import.",
    no_args_is_help=True,
)

Actor = Annotated[str | None, typer.Option(help="Who makes the change (default: OS user).")]
Reason = Annotated[str, typer.Option(help="Why; recorded in the audit log.")]


def _registry(ctx: typer.Context):
    from ragpt.softprompts.registry import PromptRegistry

    return PromptRegistry(settings_from_ctx(ctx).prompt_dir)


def _actor(actor: str | None) -> str:
    return actor if actor else getpass.getuser()


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str))


@prompts_app.command("list")
def list_prompts(
    ctx: typer.Context,
    department: Annotated[str | None, typer.Option("--department", "-d",
                                                   help="Only this department.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Versions per department with their state (draft, approved, active)."""
    try:
        reg = _registry(ctx)
        depts = [department] if department else reg.departments()
        rows = [{"department": d, **r} for d in depts for r in reg.versions(d)]
    except RagptError as e:
        fail(e)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        typer.echo("no soft prompts registered")
        return
    for r in rows:
        verdict = (r["metrics"].get("dev_verdict") or {}).get("verdict", "-").replace(" ", "-")
        metrics = " ".join(f"{k}={v}" for k, v in sorted(r["metrics"].items()) if not isinstance(v, dict))
        typer.echo(f"{r['department']:<16} {r['version']:<6} {r['state']:<9} {verdict:<9} "
                   f"{r['created'] or '-':<25} {r['author'] or '-':<12} {metrics}")


@prompts_app.command("show")
def show(ctx: typer.Context, department: str, version: str) -> None:
    """The version's metadata as JSON (after validating the artifact), with the input contract it
    is served with and its registry state (the last change: who, when, what, why)."""
    from ragpt.serving.contract import InputContract

    try:
        reg = _registry(ctx)
        meta = reg.load(department, version).meta
        _echo_json({**meta, "contract": InputContract.from_prompt_meta(meta).to_dict(),
                    "contract_recorded": "contract" in meta, "registry": reg.status(department, version)})
    except RagptError as e:
        fail(e)


def describe_change(rec: dict[str, Any]) -> str:
    """One audit record as a line a person reads: when, department, version, what, who, why."""
    action, version = rec.get("action", "?"), rec.get("version") or "-"
    what = action
    if action in ("activate", "rollback", "deactivate"):
        what = f"{action} ({rec.get('from') or 'none'} -> {rec.get('to') or 'none'})"
    elif action == "migrate":
        state = rec.get("state") or {}
        what = (f"migrate (state.json adopted: {len(state.get('versions', {}))} versions, "
                f"active {state.get('active') or 'none'})")
    elif action == "import" and rec.get("source"):
        what = f"import (from {Path(str(rec['source'])).name})"
    when = str(rec.get("time", "?")).replace("T", " ")
    line = f"{when:<24} {rec.get('department', '?'):<16} {version:<6} {what:<28} by {rec.get('actor', '?')}"
    reason = str(rec.get("reason") or "").replace("\n", " ")
    return f"{line}: {reason}" if reason else line


@prompts_app.command("log")
def log(
    ctx: typer.Context,
    department: Annotated[str | None, typer.Option("--department", "-d", help="Only this department.")] = None,
    version: Annotated[str | None, typer.Option("--version", "-v", help="Only changes touching this version.")] = None,
    last: Annotated[int | None, typer.Option("--last", "-n", min=1, help="Only the last N changes.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line, as stored.")] = False,
) -> None:
    """The audit trail, oldest first: every registration, approval, activation, rollback and
    deactivation, with who made it, when and why. It is the registry's source of truth."""
    from ragpt.softprompts.audit_log import touches

    try:
        reg = _registry(ctx)
        if department is not None:
            reg.versions(department)  # an unknown department is an error, not an empty log
        records = reg.audit(department)
    except RagptError as e:
        fail(e)
    if version is not None:
        records = [r for r in records if touches(r, version)]
    if last is not None:
        records = records[-last:]
    if not records:
        typer.echo("no changes recorded")
    for rec in records:
        typer.echo(json.dumps(rec, sort_keys=True, ensure_ascii=False) if as_json else describe_change(rec))


@prompts_app.command("approve")
def approve(ctx: typer.Context, department: str, version: str,
            actor: Actor = None, reason: Reason = "",
            force: Annotated[bool, typer.Option(
                "--force", help="Approve a draft whose dev verdict is 'worse' (needs --reason; audited).")] = False,
            ) -> None:
    """Approve a draft (draft -> approved). A draft that scored worse than no prompt on its dev
    set is refused unless --force with a --reason."""
    try:
        _registry(ctx).approve(department, version, actor=_actor(actor), reason=reason, force=force)
    except RagptError as e:
        fail(e)
    typer.echo(f"{department} {version}: approved" + (" (forced)" if force else ""))


@prompts_app.command("activate")
def activate(ctx: typer.Context, department: str, version: str,
             actor: Actor = None, reason: Reason = "") -> None:
    """Make an approved version the department's active prompt."""
    try:
        _registry(ctx).activate(department, version, actor=_actor(actor), reason=reason)
    except RagptError as e:
        fail(e)
    typer.echo(f"{department} {version}: active")


@prompts_app.command("rollback")
def rollback(ctx: typer.Context, department: str,
             actor: Actor = None, reason: Reason = "") -> None:
    """Re-activate the approved version that was active before the current one."""
    try:
        version = _registry(ctx).rollback(department, actor=_actor(actor), reason=reason)
    except RagptError as e:
        fail(e)
    typer.echo(f"{department} {version}: active (rolled back)")


@prompts_app.command("deactivate")
def deactivate(ctx: typer.Context, department: str,
               actor: Actor = None, reason: Reason = "") -> None:
    """Take the active version out of service (the department runs without a soft prompt)."""
    try:
        version = _registry(ctx).deactivate(department, actor=_actor(actor), reason=reason)
    except RagptError as e:
        fail(e)
    typer.echo(f"{department} {version}: deactivated (approved, not active)")


@prompts_app.command("diff")
def diff(ctx: typer.Context, department: str, a: str, b: str) -> None:
    """Metadata that differs between two versions, and how far apart their tensors are."""
    try:
        _echo_json(_registry(ctx).diff(department, a, b))
    except RagptError as e:
        fail(e)


@prompts_app.command("export")
def export(
    ctx: typer.Context, department: str, version: str,
    out_dir: Annotated[Path, typer.Argument(help="Folder for the PEFT adapter.")],
    peft_type: Annotated[str, typer.Option(
        help="auto (prompt-tuning for a plain prompt, prefix-tuning for a deep one), prompt-tuning "
             "or prefix-tuning (any prompt, as each layer's keys and values; loads the model).")] = "auto",
) -> None:
    """Write a version as a PEFT adapter (adapter_config.json + adapter_model.safetensors)."""
    from ragpt.lm.models import resolve_generator_path

    try:
        if peft_type not in ("auto", "prompt-tuning", "prefix-tuning"):
            raise RagptError(f"--peft-type must be auto, prompt-tuning or prefix-tuning, not {peft_type!r}")
        s = settings_from_ctx(ctx)
        registry = _registry(ctx)
        if peft_type == "auto":
            deep = registry.load(department, version).depth > 1
            peft_type = "prefix-tuning" if deep else "prompt-tuning"
        if peft_type == "prefix-tuning":
            from ragpt.lm.models import load_generator_model
            from ragpt.softprompts.artifact import base_model_fingerprint
            from ragpt.softprompts.peft_prefix import export_peft_prefix

            model, _tok = load_generator_model(s)
            prompt = registry.load(department, version, base_fingerprint=base_model_fingerprint(model),
                                   hidden_size=int(model.get_input_embeddings().weight.shape[1]),
                                   max_depth=int(model.config.num_hidden_layers))
            export_peft_prefix(prompt, out_dir, model=model, base_model_name_or_path=str(s.generator))
        else:
            from transformers import AutoConfig

            # Only the config is needed (layer and head counts), not the weights.
            where = resolve_generator_path(s)
            try:
                config = AutoConfig.from_pretrained(str(where))
            except OSError as e:
                raise RagptError(f"cannot read the generator config from {where}: {e}") from e
            registry.export_peft(department, version, out_dir,
                                 base_model_name_or_path=str(s.generator), model_config=config)
        has_adapter = "query_adapter" in registry.meta(department, version)
    except RagptError as e:
        fail(e)
    typer.echo(f"{department} {version} -> {out_dir} ({peft_type})")
    if has_adapter:
        # PEFT has no place for it: a model served from the export searches without it.
        typer.echo(f"note: {department} {version} also has a query adapter, which a PEFT adapter cannot carry; "
                   "the export holds the soft prompt only", err=True)


@prompts_app.command("import")
def import_(
    ctx: typer.Context,
    in_dir: Annotated[Path, typer.Argument(help="A PEFT prompt-tuning adapter folder.")],
    department: Annotated[str, typer.Option("--department", "-d", help="Department it is for.")],
    actor: Actor = None,
    reason: Reason = "",
) -> None:
    """Register a PEFT prompt-tuning adapter trained on the configured generator, as a draft."""
    from ragpt.lm.models import load_generator_model
    from ragpt.softprompts.artifact import base_model_fingerprint

    try:
        s = settings_from_ctx(ctx)
        # PEFT files carry no fingerprint: the adapter is vouched for against the generator
        # that this installation serves, so it is checked for that model's hidden size.
        model, _tok = load_generator_model(s)
        version = _registry(ctx).import_peft(
            in_dir, department, actor=_actor(actor), reason=reason,
            base_fingerprint=base_model_fingerprint(model),
            hidden_size=int(model.get_input_embeddings().weight.shape[1]),
        )
    except RagptError as e:
        fail(e)
    typer.echo(f"{department} {version}: imported as draft from {in_dir}")
