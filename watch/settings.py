"""params.yaml `watch:` — where `sasgate watch` looks and how it treats the Hub.

Only pydantic is imported here, so sasgate/params.py can import this module without a cycle.
Which SAEs *cover* a tuple (architecture, width range, same model variant) is not here: the
watcher judges coverage under `remediation.constraints`, the preregistered constraints the
remediation stage and the decision's reopen condition use, so the three can never disagree.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STATE = "watch/state/state.json"


class WatchParams(BaseModel):
    """Hub queries (each one `HfApi.list_models` call), the state file, and network limits."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    registry: bool = True  # also read the installed sae-lens registry (pretrained_saes.yaml)
    # A repo listed by any query is read. Authors catch untagged releases (EleutherAI's sparsify
    # repos carry no sae_lens tag); tags and searches catch everyone else.
    authors: list[str] = ["google", "EleutherAI", "jbloom", "fnlp", "canrager"]
    tags: list[str] = ["sae_lens", "sparse-autoencoder", "sparsify"]
    searches: list[str] = ["gemma-scope", "sae"]
    state: str = DEFAULT_STATE  # relative to the working directory (the project root)
    # Our own retries for the calls huggingface_hub does not retry (file downloads); listing and
    # tree calls are retried by the client itself (5 times, 1-8 s backoff, Retry-After honoured).
    # Neither retries a refusal (gated, disabled, private, gone: a skip) or a stalled request.
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # The longest any Hub request waits (connecting, each read; sasgate.watch.client): a stalled
    # Hub ends the poll with exit 75 after about this long. The client's own default is none.
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    lock_timeout_s: Annotated[float, Field(ge=0)] = 900.0  # wait this long for an overlapping run
    max_files_per_repo: Annotated[int, Field(gt=0)] = 100_000  # a bigger tree is skipped, not read

    def queries(self) -> list[tuple[str, str]]:
        """(kind, value) per list_models call, in a fixed order; the kind names the keyword."""
        return ([("author", a) for a in self.authors] + [("tag", t) for t in self.tags]
                + [("search", s) for s in self.searches])
