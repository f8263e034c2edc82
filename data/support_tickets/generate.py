"""Generate the bundled support-ticket dataset: free-text tickets -> a fixed JSON schema.

Run: python data/support_tickets/generate.py  (rewrites tickets.jsonl and production.jsonl)

Deterministic: the same seed writes byte-identical files. `tickets.jsonl` is the labelled
dataset (chat messages: system, user ticket, assistant JSON); `production.jsonl` is a batch of
unlabelled "production" requests whose mix has shifted (more technical tickets, longer texts,
a new product line), used by stage 7 to show drift, and `production_labels.jsonl` holds their
correct answers in the training format, as a reviewer would write them, for `label_window.py`
to label a drifted window of served traffic with; `preferences.jsonl` pairs each ticket's
correct JSON (chosen) with a plausible wrong answer (rejected) for DPO, ORPO and KTO. `tools.jsonl` is the
tool-calling task over the same tickets, in OpenAI's function-calling format: a shipping ticket with an order
number is answered by calling `lookup_order` (and, in some rows, the order's status comes back and the assistant
tells the customer), any other ticket by calling `create_ticket` with the fields of the JSON task.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYSTEM_PROMPT = (
    "Ticket to JSON: category (billing|shipping|refund|technical|account), "
    "priority (low|normal|urgent), order_id or null, product in lower case or null."
)

PRODUCTS = [
    "Aero Blender", "Nimbus Headphones", "Pixel Frame", "Trail Backpack", "Volt Charger",
    "Echo Speaker", "Summit Tent", "Glide Keyboard", "Orbit Mouse", "Lumen Desk Lamp",
    "Brew Kettle", "Flux Smartwatch", "Coda Earbuds", "Atlas Monitor", "Drift Scooter",
]
NEW_PRODUCTS = ["Halo Router", "Quanta Tablet", "Ember Heater"]

CUES = {
    "billing": [
        "I was charged twice for my {product}",
        "my card was billed the wrong amount for the {product}",
        "there is a charge on my statement for a {product} I never bought",
        "the invoice for my {product} shows the wrong tax",
        "I keep getting billed every month for the {product} plan",
    ],
    "shipping": [
        "my {product} still has not arrived",
        "the tracking for my {product} has not moved in a week",
        "the {product} was delivered to the wrong address",
        "the courier says the {product} parcel is lost",
        "my {product} is stuck at the depot",
    ],
    "refund": [
        "I want to return the {product} and get my money back",
        "please refund the {product}, it is not what I expected",
        "I sent the {product} back two weeks ago and have not seen a refund",
        "how do I get a refund for the {product}",
        "the {product} arrived damaged and I would like a refund",
    ],
    "technical": [
        "the {product} will not turn on",
        "the {product} keeps disconnecting",
        "the app crashes every time I pair the {product}",
        "the firmware update bricked my {product}",
        "the {product} makes a grinding noise and stops",
    ],
    "account": [
        "I cannot log in to my account to register the {product}",
        "I forgot my password and the reset email never comes",
        "please change the email address on my account",
        "my account got locked after I added the {product} to my wishlist",
        "how do I delete my account",
    ],
}
URGENT = ["This is urgent!", "Please fix this ASAP.", "I need this sorted immediately.",
          "URGENT: I need an answer today."]
LOW = ["No rush.", "Whenever you get a chance.", "Not urgent, just letting you know.",
       "Take your time."]
GREETINGS = ["Hi,", "Hello,", "Hi team,", "Dear support,", "Hey,", ""]
ORDER_FORMS = ["Order {oid}.", "My order number is {oid}.", "(order {oid})", "Ref: order {oid}.",
               "The order was {oid}."]
SIGNOFFS = ["Thanks, {name}", "Regards, {name}", "- {name}", "Cheers, {name}", "{name}", ""]
NAMES = ["Anna", "Ben", "Chen", "Dara", "Elif", "Femi", "Greta", "Hiro", "Ines", "Jon", "Kofi",
         "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
FILLERS = ["I have been a customer for years.", "This is the second time this happened.",
           "I already tried restarting everything.", "My neighbour has the same problem.",
           "I bought it as a gift.", "I attached a photo in my last email."]


def _ticket(rng: random.Random, category: str, products: list[str], filler_p: float) -> tuple[str, dict]:
    template = rng.choice(CUES[category])
    product = rng.choice(products) if "{product}" in template else None
    body = template.format(product=product)
    body = body[0].upper() + body[1:] + "."
    priority = rng.choices(["normal", "urgent", "low"], weights=[0.5, 0.3, 0.2])[0]
    oid = None
    if category != "account" and rng.random() < 0.85:
        oid = f"{rng.choice('ABCDEFGHJK')}{rng.randint(10000, 99999)}"
    parts = [rng.choice(GREETINGS), body]
    if oid:
        parts.insert(rng.choice([1, 2]), rng.choice(ORDER_FORMS).format(oid=oid))
    if rng.random() < filler_p:
        parts.append(rng.choice(FILLERS))
    if priority == "urgent":
        parts.append(rng.choice(URGENT))
    elif priority == "low":
        parts.append(rng.choice(LOW))
    parts.append(rng.choice(SIGNOFFS).format(name=rng.choice(NAMES)))
    text = " ".join(p for p in parts if p)
    label = {"category": category, "priority": priority, "order_id": oid,
             "product": product.lower() if product else None}
    return text, label


def generate(n: int, seed: int) -> list[dict]:
    """Labelled tickets as chat-message records with a stable id."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        category = rng.choice(sorted(CUES))
        text, label = _ticket(rng, category, PRODUCTS, filler_p=0.25)
        rows.append({
            "id": f"ticket-{i:05d}",
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": text},
                {"role": "assistant", "content": json.dumps(label, separators=(", ", ": "))},
            ],
        })
    return rows


def _wrong(label: dict, kind: str, rng: random.Random) -> str:
    """A plausible wrong answer of one kind for a ticket's correct label."""
    bad = dict(label)
    if kind == "category":  # the most common confusion: anything broken-sounding filed as technical
        bad["category"] = "technical" if label["category"] != "technical" else rng.choice(["shipping", "refund"])
    elif kind == "priority":  # the default priority instead of the one the ticket asks for
        bad["priority"] = "normal" if label["priority"] != "normal" else rng.choice(["low", "urgent"])
    elif kind == "dropped":  # only the fields that can be copied from the text
        bad = {"order_id": label["order_id"], "product": label["product"]}
    elif kind == "order_id":
        bad["order_id"] = f"{rng.choice('ABCDEFGHJK')}{rng.randint(10000, 99999)}"
    elif kind == "product":
        bad["product"] = rng.choice([p.lower() for p in PRODUCTS if p.lower() != label["product"]])
    answer = json.dumps(bad, separators=(", ", ": "))
    if kind == "prose":
        answer = rng.choice(["Sure! Here is the ticket as JSON: {a}", "{a}\nLet me know if you need anything else.",
                             "I think this ticket is about {c}. {a}"]).format(a=answer, c=label["category"])
    return answer


def generate_preferences(tickets: list[dict], seed: int) -> list[dict]:
    """Preference pairs over the tickets: chosen is the correct JSON, rejected a plausible wrong answer.

    Most rejected answers are the mistakes a briefly trained model makes on this task (the most
    common category, the default priority, the two fields it cannot copy from the text dropped);
    the rest are an invented order id, a wrong product, or prose around the JSON.
    """
    rng = random.Random(seed)
    rows = []
    for t in tickets:
        label = json.loads(t["messages"][-1]["content"])
        kinds = ["category", "priority", "dropped", "order_id", "prose"] + (["product"] if label["product"] else [])
        kind = rng.choices(kinds, weights=[3, 3, 3, 1, 1, 1][:len(kinds)])[0]
        rows.append({"id": t["id"].replace("ticket", "pair"), "prompt": t["messages"][:-1],
                     "chosen": [t["messages"][-1]],
                     "rejected": [{"role": "assistant", "content": _wrong(label, kind, rng)}]})
    return rows


TOOLS_PROMPT = ("You are a support assistant. For a shipping question about an order with a known number, call "
                "lookup_order; otherwise open a ticket with create_ticket (product in lower case, or null).")
TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Status and delivery date of an order.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]{5}$"}},
                       "required": ["order_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "create_ticket", "description": "Open a support ticket.",
        "parameters": {"type": "object", "properties": {
            "category": {"enum": ["billing", "shipping", "refund", "technical", "account"]},
            "priority": {"enum": ["low", "normal", "urgent"]},
            "order_id": {"type": ["string", "null"]}, "product": {"type": ["string", "null"]}},
            "required": ["category", "priority", "order_id", "product"], "additionalProperties": False}}},
]
STATUSES = ["in transit", "out for delivery", "held at the depot", "delayed by the courier"]


def generate_tools(tickets: list[dict], seed: int) -> list[dict]:
    """The tickets as tool-calling rows: the call each ticket should get, and for half of the order lookups the
    tool's answer and the assistant's reply to the customer built from it."""
    rng = random.Random(seed)
    rows = []
    for t in tickets:
        label = json.loads(t["messages"][-1]["content"])
        call_id = "call_" + t["id"].split("-")[-1]
        if label["category"] == "shipping" and label["order_id"]:
            name, args = "lookup_order", {"order_id": label["order_id"]}
        else:
            name, args = "create_ticket", label
        messages = [{"role": "system", "content": TOOLS_PROMPT}, t["messages"][1],
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}]
        if name == "lookup_order" and rng.random() < 0.5:
            status, eta = rng.choice(STATUSES), f"2026-12-{rng.randint(5, 28):02d}"
            messages += [{"role": "tool", "tool_call_id": call_id,
                          "content": json.dumps({"order_id": args["order_id"], "status": status, "eta": eta})},
                         {"role": "assistant", "content": f"Your order {args['order_id']} is {status}; "
                                                          f"expected delivery {eta}."}]
        rows.append({"id": t["id"].replace("ticket", "tool"), "messages": messages, "tools": TOOLS})
    return rows


def generate_production(n: int, seed: int, labels: list[dict] | None = None) -> list[dict]:
    """Unlabelled requests with a shifted mix: mostly technical, longer, new products (and, into `labels` when
    given, each request's correct answer as a labelled chat record with the same id)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        category = rng.choices(sorted(CUES), weights=[1, 1, 1, 1, 6])[0]
        text, label = _ticket(rng, category, PRODUCTS[:5] + NEW_PRODUCTS, filler_p=0.9)
        if rng.random() < 0.6:
            text += " " + " ".join(rng.sample(FILLERS, 2))
        rows.append({"id": f"request-{i:05d}", "prompt": text})
        if labels is not None:
            labels.append({"id": f"request-{i:05d}", "messages": [
                {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text},
                {"role": "assistant", "content": json.dumps(label, separators=(", ", ": "))}]})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1200, help="labelled tickets to write")
    parser.add_argument("--n-production", type=int, default=300, help="production requests")
    parser.add_argument("--seed", type=int, default=20261122)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    tickets = generate(args.n, args.seed)
    _write(args.out / "tickets.jsonl", tickets)
    labels: list[dict] = []
    _write(args.out / "production.jsonl", generate_production(args.n_production, args.seed + 1, labels))
    _write(args.out / "production_labels.jsonl", labels)
    _write(args.out / "preferences.jsonl", generate_preferences(tickets, args.seed + 2))
    _write(args.out / "tools.jsonl", generate_tools(tickets, args.seed + 3))
    print(f"wrote {args.n} tickets, {args.n} preference pairs, {args.n} tool-calling rows and {args.n_production} "
          "production requests "
          f"to {args.out}")


if __name__ == "__main__":
    main()
