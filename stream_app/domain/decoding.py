"""Decoding raw command bytes into validated commands.

:func:`decode_command` never raises: whatever the bytes, it returns a command
or a :class:`~stream_app.domain.model.Rejection`. It enforces every rule that
does not depend on application settings (those are checked by ``apply``).

Our rules, where the spec is silent:

- Unknown fields are ignored at every level (top level, ``session``, cart
  items, return items), never fatal.
- ``null`` for an optional field means absent (for an update: keep the stored
  value); the one exception is an attribute value, where ``null`` deletes
  the key.
- A value of the wrong JSON type (a string or a boolean where a number is
  required, a float where an integer is required, ...) is ``SCHEMA_VIOLATION``.
- Too long strings and too many elements are ``LIMIT_EXCEEDED``; too short
  strings (e.g. an empty coupon code) and pattern mismatches are
  ``SCHEMA_VIOLATION``. Lengths count Unicode code points.
- ``eventId`` must be 1..255 characters when present (an empty idempotency
  key is a client bug).
- ``position``, ``returnedQuantity`` and ``remainingQuantity`` sent in cart
  items are ignored: the processor computes them.
- Additional cost prices must be finite numbers (may be negative); item
  ``price`` and ``weight``/``height``/``width``/``length`` must be >= 0.
- ``returnedCartItems`` must hold 1..1000 entries, each with ``position``
  (int >= 0) and/or ``sku`` (non-empty string), and an optional ``quantity``
  (int >= 1).
- Money inputs (item ``price``, session and item additional cost ``price``)
  must be representable as defined in ``stream_app.domain.numbers``: as
  decoded, within ``[-2^63, 2^63)`` (``-2^63`` only as an integer
  literal). A larger one (``1.7e308``, an integer literal beyond 2^63) is
  ``LIMIT_EXCEEDED`` with the pointer to that price, rather than being
  emitted as a rounded float or ``null``.
- Nesting depth: arrays and objects may nest at most
  :data:`MAX_COMMAND_DEPTH` (32) levels, the command object itself being
  level 1; equivalently, the JSON pointer of every array or object has at
  most 31 reference tokens. The limit is enforced on the free-form values the
  processor keeps, session ``attributes`` (level 3, so their values may nest
  29 more levels) and cart item ``attributes`` (level 5, 27 more levels); a
  deeper one is ``LIMIT_EXCEEDED`` with the pointer of the first array or
  object (in document order) at level 33. Every typed field has a fixed depth
  of at most 6, and ignored fields are never stored or emitted, so their
  depth is not checked (a rejection carries the original bytes). Why 32:
  every document the processor writes then nests at most 32 levels plus its
  envelope (a rejection's ``command`` echo adds one), far below orjson's
  writing limit of 254 and below the strictest common consumer default
  (System.Text.Json's 64), while Talon.One attributes are flat scalars and
  lists.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

import msgspec

from stream_app.domain.model import (
    AdditionalCost,
    CartItem,
    Command,
    Product,
    Reason,
    Rejection,
    ReopenCommand,
    ReturnCommand,
    ReturnItem,
    SessionPatch,
    SessionState,
    UpdateCommand,
)
from stream_app.domain.numbers import MONEY_LIMIT, MONEY_LIMIT_FLOAT, json_money
from stream_app.domain.rejections import InvalidCommandError, make_rejection, pointer_token
from stream_app.json import loads

__all__ = [
    "MAX_CART_ITEMS",
    "MAX_CART_QUANTITY",
    "MAX_COMMAND_DEPTH",
    "MAX_IDENTIFIERS",
    "MAX_LOYALTY_CARDS",
    "decode_command",
]

MAX_CART_ITEMS: Final = 1000
MAX_CART_QUANTITY: Final = 10_000  # with flattening on; checked by apply
MAX_IDENTIFIERS: Final = 5
MAX_LOYALTY_CARDS: Final = 1
MAX_RETURN_ITEMS: Final = 1000
INT32_MAX: Final = 2**31 - 1
#: Integers the worker writes are 64-bit (orjson reads up to 2^64 - 1).
_I64: Final = 2**63
#: Most levels of nested arrays and objects in a command, the command object
#: being level 1 (see the module docstring for where it is enforced and why).
MAX_COMMAND_DEPTH: Final = 32

_LOYALTY_CARD: Final = re.compile(r"[A-Za-z0-9._%+@-]+")
_STATES: Final = {s.value: s for s in SessionState}
_SCHEMA: Final = Reason.SCHEMA_VIOLATION
_LIMIT: Final = Reason.LIMIT_EXCEEDED


def decode_command(raw: bytes) -> Command | Rejection:
    """Parse and validate one command record. Never raises.

    Tries the typed fast path first (see "fast path" at the end of this
    module); whatever it does not take is decided by :func:`decode_by_rules`,
    which also words every rejection.
    """
    command = _fast_command(raw)
    return command if command is not None else decode_by_rules(raw)


def decode_by_rules(raw: bytes) -> Command | Rejection:
    """:func:`decode_command` without the fast path (what it must agree with)."""
    try:
        doc = loads(raw)
    except (ValueError, TypeError) as exc:
        return make_rejection(Reason.MALFORMED_JSON, "", str(exc))
    try:
        return _command(doc)
    except InvalidCommandError as exc:
        return exc.rejection


def _command(doc: Any) -> Command:
    if type(doc) is not dict:
        raise InvalidCommandError(_SCHEMA, "", "the command must be a JSON object")
    kind = doc.get("type")
    integration_id = _string(doc.get("integrationId"), "/integrationId", 1, 1000)
    event_id = doc.get("eventId")
    if event_id is not None:
        event_id = _string(event_id, "/eventId", 1, 255)
    application_id = doc.get("applicationId")
    if application_id is not None and (
        type(application_id) is not int or not 0 < application_id <= INT32_MAX
    ):
        raise InvalidCommandError(
            _SCHEMA, "/applicationId", "applicationId must be an integer in 1..2147483647"
        )
    if kind == "update":
        session = doc.get("session")
        if type(session) is not dict:
            raise InvalidCommandError(_SCHEMA, "/session", "session must be a JSON object")
        return UpdateCommand(integration_id, _patch(session), event_id, application_id)
    if kind == "return":
        return ReturnCommand(
            integration_id, _return_items(doc.get("returnedCartItems")), event_id, application_id
        )
    if kind == "reopen":
        return ReopenCommand(integration_id, event_id, application_id)
    raise InvalidCommandError(_SCHEMA, "/type", "type must be one of 'update', 'return', 'reopen'")


# --------------------------------------------------------------------------- primitives


def _string(value: Any, pointer: str, minimum: int, maximum: int | None = None) -> str:
    if type(value) is not str:
        raise InvalidCommandError(_SCHEMA, pointer, "must be a string")
    size = len(value)
    if size < minimum:
        raise InvalidCommandError(_SCHEMA, pointer, f"must be at least {minimum} characters long")
    if maximum is not None and size > maximum:
        raise InvalidCommandError(_LIMIT, pointer, f"must be at most {maximum} characters long")
    return value


def _string_list(
    value: Any, pointer: str, minimum: int, maximum: int | None, max_items: int | None
) -> tuple[str, ...]:
    if type(value) is not list:
        raise InvalidCommandError(_SCHEMA, pointer, "must be a list of strings")
    if max_items is not None and len(value) > max_items:
        raise InvalidCommandError(_LIMIT, pointer, f"must have at most {max_items} items")
    for index, element in enumerate(value):
        _string(element, f"{pointer}/{index}", minimum, maximum)
    return tuple(value)


def _number(value: Any, pointer: str, *, non_negative: bool) -> int | float:
    kind = type(value)
    # orjson never yields NaN or infinity; bool is excluded by the exact type test.
    if kind is not float and kind is not int:
        raise InvalidCommandError(_SCHEMA, pointer, "must be a number")
    if non_negative and value < 0:
        raise InvalidCommandError(_SCHEMA, pointer, "must be greater than or equal to 0")
    if kind is int and not -_I64 <= value < _I64:
        # Written out as read, it would fail a consumer that binds it to a long.
        raise InvalidCommandError(
            _LIMIT, pointer, "must lie in the signed 64-bit range, as integers the worker writes"
        )
    return value  # type: ignore[no-any-return]


def _decimal(value: Any, pointer: str, *, non_negative: bool) -> Decimal:
    kind = type(value)
    if kind is not float and kind is not int:
        raise InvalidCommandError(_SCHEMA, pointer, "must be a number")
    if non_negative and value < 0:
        raise InvalidCommandError(_SCHEMA, pointer, "must be greater than or equal to 0")
    money = json_money(value)
    if money is None:
        raise InvalidCommandError(
            _LIMIT,
            pointer,
            f"{value!r} cannot be carried exactly: money values must lie in "
            f"-9223372036854775808..9223372036854775807 (the signed 64-bit range; "
            f"-2^63 only written as an integer)",
        )
    return money


def _object(value: Any, pointer: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise InvalidCommandError(_SCHEMA, pointer, "must be a JSON object")
    return value


def _costs(value: Any, pointer: str) -> dict[str, AdditionalCost]:
    costs = _object(value, pointer)
    result: dict[str, AdditionalCost] = {}
    for name, cost in costs.items():
        here = f"{pointer}/{pointer_token(name)}"
        if type(cost) is not dict:
            raise InvalidCommandError(_SCHEMA, here, "must be an object with a price")
        if "price" not in cost:
            raise InvalidCommandError(_SCHEMA, f"{here}/price", "price is required")
        result[name] = AdditionalCost(_decimal(cost["price"], f"{here}/price", non_negative=False))
    return result


# --------------------------------------------------------------------------- nesting depth

_SESSION_ATTRIBUTES_LEVEL: Final = 3  # /session/attributes
_ITEM_ATTRIBUTES_LEVEL: Final = 5  # /session/cartItems/<n>/attributes
_CONTAINERS: Final = frozenset((dict, list))


def _crossing(value: dict[str, Any] | list[Any], level: int) -> str | None:
    """The pointer, from ``value`` (which is at ``level``), of the first
    container in it past the limit.

    Depth first in document order; never descends past the limit, so the
    recursion is at most :data:`MAX_COMMAND_DEPTH` frames deep. The pointer
    is written only for the container found: written for every container
    passed, a command of 86,000 empty arrays took 40 ms to check, 400 times
    its decoding, at every resend.
    """
    deeper = level + 1
    members = value.items() if type(value) is dict else enumerate(value)
    for key, member in members:
        if type(member) in _CONTAINERS:
            if deeper > MAX_COMMAND_DEPTH:
                return f"/{pointer_token(str(key))}"
            if member:  # an empty one nests no deeper
                found = _crossing(member, deeper)
                if found is not None:
                    return f"/{pointer_token(str(key))}{found}"
    return None


def _require_depth(value: dict[str, Any], pointer: str, level: int) -> None:
    """Reject ``value`` (an object at ``level``) if it nests past the limit.

    Callers test first whether ``value`` holds any array or object at all
    (the common case is flat), so this runs only for nested values.
    """
    crossing = _crossing(value, level)
    if crossing is not None:
        raise InvalidCommandError(
            _LIMIT,
            f"{pointer}{crossing}",
            f"arrays and objects may nest at most {MAX_COMMAND_DEPTH} levels deep in a "
            f"command (the command object is level 1); this one is level {MAX_COMMAND_DEPTH + 1}",
        )


# --------------------------------------------------------------------------- update


def _patch(session: dict[str, Any]) -> SessionPatch:
    get = session.get
    profile_id = get("profileId")
    if profile_id is not None:
        profile_id = _string(profile_id, "/session/profileId", 0, 1000)
    store = get("storeIntegrationId")
    if store is not None:
        store = _string(store, "/session/storeIntegrationId", 1, 1000)
    coupons = get("couponCodes")
    if coupons is not None:
        coupons = _string_list(coupons, "/session/couponCodes", 1, 100, None)
    referral = get("referralCode")
    if referral is not None:
        referral = _string(referral, "/session/referralCode", 0, 100)
    cards = get("loyaltyCards")
    if cards is not None:
        cards = _string_list(cards, "/session/loyaltyCards", 4, 108, MAX_LOYALTY_CARDS)
        for index, card in enumerate(cards):
            if _LOYALTY_CARD.fullmatch(card) is None:
                raise InvalidCommandError(
                    _SCHEMA,
                    f"/session/loyaltyCards/{index}",
                    "must match ^[A-Za-z0-9._%+@-]+$",
                )
    state = get("state")
    if state is not None:
        state = _STATES.get(state) if type(state) is str else None
        if state is None:
            raise InvalidCommandError(
                _SCHEMA,
                "/session/state",
                "state must be one of 'open', 'closed', 'cancelled'",
            )
    items = get("cartItems")
    if items is not None:
        items = _cart(items)
    costs = get("additionalCosts")
    if costs is not None:
        costs = _costs(costs, "/session/additionalCosts")
    identifiers = get("identifiers")
    if identifiers is not None:
        identifiers = _string_list(identifiers, "/session/identifiers", 0, None, MAX_IDENTIFIERS)
    attributes = get("attributes")
    if attributes is not None:
        attributes = _object(attributes, "/session/attributes")
        for value in attributes.values():
            if type(value) in _CONTAINERS:
                _require_depth(attributes, "/session/attributes", _SESSION_ATTRIBUTES_LEVEL)
                break
    return SessionPatch(
        profile_id,
        store,
        coupons,
        referral,
        cards,
        state,
        items,
        costs,
        identifiers,
        attributes,
    )


def _cart(items: Any) -> tuple[CartItem, ...]:
    if type(items) is not list:
        raise InvalidCommandError(_SCHEMA, "/session/cartItems", "cartItems must be a list")
    if len(items) > MAX_CART_ITEMS:
        raise InvalidCommandError(
            _LIMIT, "/session/cartItems", f"at most {MAX_CART_ITEMS} cart items per command"
        )
    return tuple([_cart_item(item, position) for position, item in enumerate(items)])


_MISSING: Final = object()


def _item_pointer(position: int, field: str) -> str:
    return f"/session/cartItems/{position}/{field}"


def _cart_item(item: Any, position: int) -> CartItem:
    # Hot path (up to 1000 per command): pointers are only built on failure.
    if type(item) is not dict:
        raise InvalidCommandError(
            _SCHEMA, f"/session/cartItems/{position}", "a cart item must be a JSON object"
        )
    get = item.get
    sku = get("sku")
    if type(sku) is not str or not sku:
        raise InvalidCommandError(
            _SCHEMA, _item_pointer(position, "sku"), "sku must be a non-empty string"
        )
    quantity = get("quantity")
    if type(quantity) is not int or not 1 <= quantity < _I64:
        raise InvalidCommandError(
            _SCHEMA,
            _item_pointer(position, "quantity"),
            "quantity must be an integer from 1 to 2^63 - 1",
        )
    raw_price = get("price", _MISSING)
    kind = type(raw_price)
    # Inlined json_money (numbers.py): representable inputs are a range.
    if kind is float and 0 <= raw_price < MONEY_LIMIT_FLOAT:
        price = Decimal(repr(raw_price))
    elif kind is int and 0 <= raw_price < MONEY_LIMIT:
        price = Decimal(raw_price)
    elif raw_price is _MISSING:
        raise InvalidCommandError(_SCHEMA, _item_pointer(position, "price"), "price is required")
    else:
        price = _decimal(raw_price, _item_pointer(position, "price"), non_negative=True)
    name = get("name")
    if name is not None and type(name) is not str:
        raise InvalidCommandError(_SCHEMA, _item_pointer(position, "name"), "must be a string")
    category = get("category")
    if category is not None and type(category) is not str:
        raise InvalidCommandError(_SCHEMA, _item_pointer(position, "category"), "must be a string")
    product = get("product")
    if product is not None:
        product_doc = _object(product, _item_pointer(position, "product"))
        product = Product(
            _string(product_doc.get("name"), _item_pointer(position, "product/name"), 0)
        )
    weight = get("weight")
    height = get("height")
    width = get("width")
    length = get("length")
    if weight is not None or height is not None or width is not None or length is not None:
        for field, value in (
            ("weight", weight),
            ("height", height),
            ("width", width),
            ("length", length),
        ):
            if value is not None:
                _number(value, _item_pointer(position, field), non_negative=True)
    attributes = get("attributes")
    if attributes is not None:
        if type(attributes) is not dict:
            raise InvalidCommandError(
                _SCHEMA, _item_pointer(position, "attributes"), "must be a JSON object"
            )
        for value in attributes.values():
            if type(value) in _CONTAINERS:
                _require_depth(
                    attributes, _item_pointer(position, "attributes"), _ITEM_ATTRIBUTES_LEVEL
                )
                break
    costs = get("additionalCosts")
    if costs is not None:
        costs = _costs(costs, _item_pointer(position, "additionalCosts"))
    return CartItem(
        sku,
        quantity,
        price,
        position,
        0,
        name,
        category,
        product,
        weight,
        height,
        width,
        length,
        attributes,
        costs,
    )


# --------------------------------------------------------------------------- return


def _return_items(items: Any) -> tuple[ReturnItem, ...]:
    pointer = "/returnedCartItems"
    if type(items) is not list:
        raise InvalidCommandError(_SCHEMA, pointer, "returnedCartItems must be a list")
    if not items:
        raise InvalidCommandError(_SCHEMA, pointer, "returnedCartItems must not be empty")
    if len(items) > MAX_RETURN_ITEMS:
        raise InvalidCommandError(_LIMIT, pointer, f"at most {MAX_RETURN_ITEMS} returned items")
    result = []
    for index, item in enumerate(items):
        base = f"{pointer}/{index}"
        if type(item) is not dict:
            raise InvalidCommandError(_SCHEMA, base, "a returned item must be a JSON object")
        position = item.get("position")
        if position is not None and (type(position) is not int or not 0 <= position < _I64):
            # Bounded as quantity is (and as the fast path bounds it): a
            # position of 2^63 or more decoded and was echoed in the rejection.
            raise InvalidCommandError(
                _SCHEMA, f"{base}/position", "position must be an integer from 0 to 2^63 - 1"
            )
        sku = item.get("sku")
        if sku is not None and (type(sku) is not str or not sku):
            raise InvalidCommandError(_SCHEMA, f"{base}/sku", "sku must be a non-empty string")
        if position is None and sku is None:
            raise InvalidCommandError(_SCHEMA, base, "position or sku is required")
        quantity = item.get("quantity")
        if quantity is not None and (type(quantity) is not int or not 1 <= quantity < _I64):
            raise InvalidCommandError(
                _SCHEMA, f"{base}/quantity", "quantity must be an integer from 1 to 2^63 - 1"
            )
        result.append(ReturnItem(position, sku, quantity))
    return tuple(result)


# --------------------------------------------------------------------------- fast path
#
# msgspec decodes the bytes straight into the typed structs below, checking
# types, lengths and ranges in C; the rules above then run only for what it
# does not take. It takes a document only when the rules (decode_by_rules)
# would accept it and build the very same command, and hands everything else
# on; tests/domain/test_fast_decoding.py checks this on generated documents.
# What it hands on:
#
# - no unknown fields (``forbid_unknown_fields``): msgspec would skip them
#   without the checks orjson makes (invalid UTF-8, numbers out of range);
#   a command with fields we ignore is read by the rules above;
# - integers within int64: orjson reads larger ones as floats;
# - attribute values only as scalars: nesting is checked above;
# - money outside the representable range and negative sizes, a loyalty card
#   not matching its pattern, an update without a session, a return entry
#   with neither position nor sku: handed on, to be worded above.

_Int = Annotated[int, msgspec.Meta(ge=-_I64, le=_I64 - 1)]
_Number = _Int | float
_Scalar = str | _Int | float | bool | None
_Count = Annotated[int, msgspec.Meta(ge=1, le=_I64 - 1)]
#: An item's price: non-negative and below 2^63 (MONEY_LIMIT), checked in C.
#: The float bound is the int MONEY_LIMIT, as in ``contract.Price``: typing
#: caches equal ``Annotated`` types, so a float bound here would be the one
#: the published command schema shows.
_Price = (
    Annotated[int, msgspec.Meta(ge=0, le=_I64 - 1)]
    | Annotated[float, msgspec.Meta(ge=0, lt=MONEY_LIMIT)]
)
#: An item's weight, height, width or length: non-negative.
_Size = Annotated[int, msgspec.Meta(ge=0, le=_I64 - 1)] | Annotated[float, msgspec.Meta(ge=0)]


class _FastCost(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    price: _Number


class _FastProduct(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    # Not the domain's Product, which takes unknown fields (the stored form).
    name: str


class _FastItem(msgspec.Struct, forbid_unknown_fields=True, rename="camel", gc=False):
    sku: Annotated[str, msgspec.Meta(min_length=1)]
    quantity: _Count
    price: _Price
    name: str | None = None
    category: str | None = None
    product: _FastProduct | None = None
    weight: _Size | None = None
    height: _Size | None = None
    width: _Size | None = None
    length: _Size | None = None
    attributes: dict[str, _Scalar] | None = None
    additional_costs: dict[str, _FastCost] | None = None


class _FastPatch(msgspec.Struct, forbid_unknown_fields=True, rename="camel", gc=False):
    profile_id: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    store_integration_id: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)] | None = None
    coupon_codes: tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=100)], ...] | None = (
        None
    )
    referral_code: Annotated[str, msgspec.Meta(max_length=100)] | None = None
    loyalty_cards: (
        Annotated[
            tuple[Annotated[str, msgspec.Meta(min_length=4, max_length=108)], ...],
            msgspec.Meta(max_length=MAX_LOYALTY_CARDS),
        ]
        | None
    ) = None
    state: Literal["open", "closed", "partially_returned", "cancelled"] | None = None
    cart_items: Annotated[list[_FastItem], msgspec.Meta(max_length=MAX_CART_ITEMS)] | None = None
    additional_costs: dict[str, _FastCost] | None = None
    identifiers: Annotated[tuple[str, ...], msgspec.Meta(max_length=MAX_IDENTIFIERS)] | None = None
    attributes: dict[str, _Scalar] | None = None


class _FastReturnItem(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    position: Annotated[int, msgspec.Meta(ge=0, le=_I64 - 1)] | None = None
    sku: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    quantity: _Count | None = None


class _FastCommand(msgspec.Struct, forbid_unknown_fields=True, rename="camel", gc=False):
    type: Literal["update", "return", "reopen"]
    integration_id: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] | None = None
    application_id: Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)] | None = None
    session: _FastPatch | None = None
    returned_cart_items: (
        Annotated[list[_FastReturnItem], msgspec.Meta(min_length=1, max_length=MAX_RETURN_ITEMS)]
        | None
    ) = None


_FAST: Final = msgspec.json.Decoder(_FastCommand)


class _HandOnError(Exception):
    """The fast path does not take this document: the rules above decide it."""


def _fast_command(raw: bytes) -> Command | None:
    """The command in ``raw`` when the fast path takes it, else None."""
    try:
        doc = _FAST.decode(raw)
    except (ValueError, RecursionError):
        # msgspec's DecodeError and ValidationError, UnicodeDecodeError; and
        # nesting deeper than msgspec reads, which orjson's own limit decides.
        return None
    try:
        if doc.type == "update":
            if doc.session is None:
                return None
            patch = _fast_patch(doc.session)
            return UpdateCommand(doc.integration_id, patch, doc.event_id, doc.application_id)
        if doc.type == "return":
            entries = doc.returned_cart_items
            if entries is None:
                return None
            items = []
            for entry in entries:
                if entry.position is None and entry.sku is None:
                    return None
                items.append(ReturnItem(entry.position, entry.sku, entry.quantity))
            return ReturnCommand(doc.integration_id, tuple(items), doc.event_id, doc.application_id)
        return ReopenCommand(doc.integration_id, doc.event_id, doc.application_id)
    except _HandOnError:
        return None


def _fast_patch(patch: _FastPatch) -> SessionPatch:
    cards = patch.loyalty_cards
    if cards is not None:
        for card in cards:
            if _LOYALTY_CARD.fullmatch(card) is None:
                raise _HandOnError
    items = patch.cart_items
    return SessionPatch(
        patch.profile_id,
        patch.store_integration_id,
        patch.coupon_codes,
        patch.referral_code,
        cards,
        None if patch.state is None else _STATES[patch.state],
        None if items is None else _fast_cart(items),
        None if patch.additional_costs is None else _fast_costs(patch.additional_costs),
        patch.identifiers,
        patch.attributes,
    )


#: Decimal(repr(price)) of recent float prices and additional costs: a
#: catalog's prices repeat. Never 0.0, which would also answer for -0.0
#: (equal, but another Decimal).
_PRICES: Final[dict[float, Decimal]] = {}
_PRICES_CACHED: Final = 4096


def _remember_price(raw_price: float, money: Decimal) -> Decimal:
    """``money``, remembered in :data:`_PRICES` as the decimal of ``raw_price``
    (unless it is 0.0 or -0.0); called only for prices not found there."""
    if raw_price:
        if len(_PRICES) >= _PRICES_CACHED:
            _PRICES.clear()
        _PRICES[raw_price] = money
    return money


def _fast_cart(items: list[_FastItem]) -> tuple[CartItem, ...]:
    # Prices and sizes were range-checked by msgspec (_Price, _Size): the rules'
    # non-negative price below MONEY_LIMIT (see _cart_item) and sizes >= 0.
    cart = []
    prices = _PRICES
    for position, item in enumerate(items):
        raw_price = item.price
        if type(raw_price) is float:
            price = prices.get(raw_price)
            if price is None:
                price = _remember_price(raw_price, Decimal(repr(raw_price)))
        else:
            price = Decimal(raw_price)
        costs = item.additional_costs
        product = item.product
        cart.append(
            CartItem(
                item.sku,
                item.quantity,
                price,
                position,
                0,
                item.name,
                item.category,
                None if product is None else Product(product.name),
                item.weight,
                item.height,
                item.width,
                item.length,
                item.attributes,
                None if costs is None else _fast_costs(costs),
            )
        )
    return tuple(cart)


def _fast_costs(costs: dict[str, _FastCost]) -> dict[str, AdditionalCost]:
    # The prices _fast_cart remembers are representable (0 <= price < 2^63),
    # and so are those remembered here: json_money checked them.
    result = {}
    prices = _PRICES
    for name, cost in costs.items():
        raw_price = cost.price
        money = prices.get(raw_price) if type(raw_price) is float else None
        if money is None:
            money = json_money(raw_price)
            if money is None:
                raise _HandOnError
            if type(raw_price) is float:
                _remember_price(raw_price, money)
        result[name] = AdditionalCost(money)
    return result
