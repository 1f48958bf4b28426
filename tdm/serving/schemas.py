"""Request and response bodies of the service (pydantic; they make the OpenAPI document).

Requests are strict: unknown fields, a string for a number, a float for an integer or a number
for a boolean are refused (422), so a typo never silently changes a request.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Id = Annotated[int, Field(ge=0, le=2**63 - 1)]
Timestamp = Annotated[int, Field(ge=0, le=2**63 - 1, description="Unix time, seconds")]
BehaviorType = Literal["pv", "buy", "cart", "fav"]
FilterMode = Literal["none", "items", "categories"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Event(_Strict):
    """One behaviour of a user."""

    user_id: Id
    item_id: Id
    behavior_type: BehaviorType = "pv"
    timestamp: Timestamp


class EventsRequest(_Strict):
    """``POST /v1/events``: behaviours to store (at most ``serve.max_events``)."""

    events: list[Event] = Field(min_length=1)


class EventsResponse(BaseModel):
    accepted: int = Field(description="events stored (durably: they survive a crash)")
    users: int = Field(description="distinct users among them")
    unknown_items: list[int] = Field(
        description="item ids the served model does not know (stored all the same: another "
        "model may know them)"
    )


class HistoryEntry(_Strict):
    """One behaviour of an explicit history."""

    item_id: Id
    timestamp: Timestamp | None = Field(
        None, description="missing: at the request's time (the most recent time window)"
    )


class RecommendRequest(_Strict):
    """``POST /v1/recommend``: ``user_id`` (history from the store) or ``history``, not both.

    ``exclude_seen`` is shorthand for ``filter``: true = ``"items"``, false = ``"none"``;
    ``filter`` alone also allows ``"categories"`` (Sec. 5.3). Given both, they must agree.
    """

    user_id: Id | None = None
    history: list[HistoryEntry] | None = Field(
        None, description="explicit behaviours (at most serve.max_request_history)"
    )
    k: int = Field(10, ge=1, description="items to return; at most retrieval.max_k")
    exclude_seen: bool | None = Field(None, description="default true")
    filter: FilterMode | None = Field(None, description="default from exclude_seen")
    now: Timestamp | None = Field(
        None, description="time the behaviours' ages are measured from; default the latest"
    )

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id and history")
        if self.filter is not None and self.exclude_seen is not None:
            if self.exclude_seen != (self.filter != "none"):
                raise ValueError(
                    f"exclude_seen={str(self.exclude_seen).lower()} contradicts "
                    f"filter={self.filter!r}"
                )
        return self

    @property
    def mode(self) -> str:
        if self.filter is not None:
            return self.filter
        return "none" if self.exclude_seen is False else "items"


class Item(BaseModel):
    item_id: int
    score: float | None = Field(
        description="the model's logit; null for most-popular items (cold start, fill-ins)"
    )
    title: str | None = None
    category_id: int
    category: str | None = None
    popularity: int = Field(description="training behaviours on the item")


class RecommendResponse(BaseModel):
    items: list[Item]
    cold_start: bool = Field(
        description="true: the most-popular list, because no behaviour of the user is known "
        "(a user without stored behaviours, or a history of unknown items only)"
    )
    unknown_items: list[int] = Field(description="history items the model does not know, ignored")
    history_length: int = Field(description="known behaviours used (the model reads the last "
                                "data.max_history)")  # fmt: skip
    filter: FilterMode
    k: int
    model_version: str = Field(description="the model that answered (all of this answer)")


class PathRequest(_Strict):
    """``POST /v1/path``: the tree path of ``item_id`` scored for a user or a history."""

    item_id: Id
    user_id: Id | None = None
    history: list[HistoryEntry] | None = None
    now: Timestamp | None = None

    @model_validator(mode="after")
    def _at_most_one_source(self) -> PathRequest:
        if self.user_id is not None and self.history is not None:
            raise ValueError("give at most one of user_id and history")
        return self


class PathNode(BaseModel):
    node_id: int
    level: int
    n_leaves: int = Field(description="items under the node")
    score: float | None = Field(description="the model's logit for the user (null at the root)")
    probability: float | None


class PathResponse(BaseModel):
    item: dict
    nodes: list[PathNode]
    history_length: int
    unknown_items: list[int]
    model_version: str


class ReloadRequest(_Strict):
    """``POST /v1/reload``: load the model source again (or ``model``) and switch to it."""

    model: str | None = Field(
        None, description="a model folder or models:/NAME/ALIAS|VERSION; default the current"
    )
    force: bool = Field(False, description="reload even when the version did not change")


class ErrorBody(BaseModel):
    error: str = Field(description="a code: invalid_request, not_found, too_large, ...")
    message: str
    details: list[dict] | None = None
