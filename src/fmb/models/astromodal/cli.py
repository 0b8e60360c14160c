"""`fmb tokenize`: astromodal's own commands (the registry adds them to the `fmb` command). Heavy
imports happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Tokenisers (astromodal): fit them on S-PLUS fields, encode fields into token shards.",
                  no_args_is_help=True)


@app.command("fit")
def tokenize_fit(
    kind: Annotated[str, typer.Argument(help="Tokeniser to fit: scalar, spectrum, image or all.")],
    data: Annotated[Path, typer.Option("--data", help="Directory of datacube_<FIELD>.parquet files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Tokeniser directory to write.")],
    config: Annotated[list[str], typer.Option("--config", "-c", help="YAML file with a `tokenizer:` section (repeatable).")] = None,
    set_: Annotated[list[str], typer.Option("--set", "-s", help="Override: tokenizer.key=value (repeatable).")] = None,
) -> None:
    """Fit tokenisers; settings come from a YAML file (its `tokenizer:` section) and --set key=value."""
    from fmb.models.astromodal.tokenize import fit_from_options

    written = fit_from_options(kind, data, out, config or [], set_ or [])
    typer.echo(f"wrote {kind} tokenizer(s) to {written}")


@app.command("encode")
def tokenize_encode(
    data: Annotated[Path, typer.Option("--data", help="Directory of datacube_<FIELD>.parquet files.")],
    tokenizers: Annotated[Path, typer.Option("--tokenizers", "-t", help="Fitted tokeniser directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token shard directory to write.")],
) -> None:
    """Encode fields into token shards (memory-mapped, random access) for training."""
    from fmb.models.astromodal.tokenize import encode_dataset

    typer.echo(f"wrote token shards to {encode_dataset(data, tokenizers, out)}")
