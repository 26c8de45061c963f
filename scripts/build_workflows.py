"""Write the shipped UI-format workflows (schema 0.4) in workflows/ from the compact descriptions below.

    python scripts/build_workflows.py

Widget values follow the node contract (nodes/contract.py), so a contract change is one re-run away.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_loom.nodes.contract import CORE_NODES, NODES
from lora_loom.sd15.builtin import BUILT_IN_TOY

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SCHEMAS = {schema.node_id: schema for schema in NODES + CORE_NODES}

# (id, type, position, widget values by name, links {input name: (source id, output slot)})
Node = tuple[int, str, tuple[int, int], dict, dict]


def build(nodes: list[Node], title: str) -> dict:
    links, outgoing = [], {}
    for node_id, node_type, _, _, inputs in nodes:
        link_inputs = [item.name for item in SCHEMAS[node_type].inputs if not item.is_widget]
        for name, (source, slot) in inputs.items():
            link_id = len(links) + 1
            kind = SCHEMAS[node_type].input(name).type
            links.append([link_id, source, slot, node_id, link_inputs.index(name), kind])
            outgoing.setdefault((source, slot), []).append(link_id)
    incoming = {(link[3], link[4]): link[0] for link in links}
    ui_nodes = []
    for order, (node_id, node_type, position, widgets, _) in enumerate(nodes):
        schema = SCHEMAS[node_type]
        values = []
        for widget in schema.widgets:
            values.append(widgets.get(widget.name, widget.default))
            if widget.control_after_generate:
                values.append("fixed")
        link_inputs = [item for item in schema.inputs if not item.is_widget]
        ui_nodes.append(
            {
                "id": node_id,
                "type": node_type,
                "pos": list(position),
                "size": [320, 60 + 26 * (len(schema.inputs) + len(schema.outputs))],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": [
                    {"name": item.name, "type": item.type, "link": incoming.get((node_id, k))}
                    for k, item in enumerate(link_inputs)
                ],
                "outputs": [
                    {"name": out.name, "type": out.type, "links": outgoing.get((node_id, k), []), "slot_index": k}
                    for k, out in enumerate(schema.outputs)
                ],
                "properties": {"Node name for S&R": node_type},
                "widgets_values": values,
            }
        )
    return {
        "last_node_id": max(node[0] for node in nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}, "title": title},
        "version": 0.4,
    }


SAMPLE = dict(
    negative_prompt="",
    seed=42,
    steps=20,
    cfg=2.0,  # the toy base follows prompts best at CFG 1.5-2; 7 over-guides it (docs/toy-world.md)
    sampler_name="euler",
    scheduler="normal",
    width=64,
    height=64,
    batch_size=4,
)
BASE: Node = (1, "LoadBase", (40, 80), {"ckpt_name": BUILT_IN_TOY, "dtype": "auto"}, {})
GRID_PROMPTS = (
    "a red circle on the left, blue background",
    "a large yellow square at the top right on a black background",
    "green triangle, bottom centre, on white",
    "a purple ring in the bottom left, orange background",
)
# The built-in LoRAs (sd15/builtin/loras/, trained by bench/bench_quality.py --keep-loras) of two concepts the
# base never saw: the workflows run as shipped, with no setup step.
STAR, CYAN = "toy-star (built-in)", "toy-cyan (built-in)"


def grid_workflow() -> list[Node]:
    nodes: list[Node] = [BASE]
    grid_links = {}
    for row, prompt in enumerate(GRID_PROMPTS):
        sampler_id, save_id = 10 + row, 20 + row
        y = 40 + row * 480  # a Sampler node is ~430 px tall in the editor
        nodes.append((sampler_id, "Sampler", (400, y), {"prompt": prompt, **SAMPLE, "seed": 1}, {"base": (1, 0)}))
        nodes.append(
            (
                save_id,
                "SaveImage",
                (760, y),
                {"filename_prefix": f"toy_world/row{row + 1}"},
                {"images": (sampler_id, 0)},
            )
        )
        grid_links[f"row_{row + 1}"] = (sampler_id, 0)
    labels = "\n".join(GRID_PROMPTS)
    nodes.append((30, "LoomImageGrid", (1120, 40), {"row_labels": labels, "upscale": 3}, grid_links))
    nodes.append((31, "SaveImage", (1480, 40), {"filename_prefix": "toy_world/grid"}, {"images": (30, 0)}))
    return nodes


WORKFLOWS_BY_NAME: dict[str, list[Node]] = {
    "toy_world_grid": grid_workflow(),
    "txt2img_one_lora": [
        BASE,
        (2, "LoadLoRA", (40, 280), {"lora_name": STAR}, {}),
        (
            3,
            "ApplyLoRA",
            (400, 120),
            {"strength_unet": 1.0, "strength_text_encoder": 1.0},
            {"base": (1, 0), "lora": (2, 0)},
        ),
        (
            4,
            "Sampler",
            (760, 80),
            {"prompt": "a large red star in the centre, blue background", **SAMPLE},
            {"base": (3, 0)},
        ),
        (5, "SaveImage", (1120, 80), {"filename_prefix": "loom_one_lora"}, {"images": (4, 0)}),
    ],
    # Two concepts the base never saw, one LoRA each, stacked: a cyan star needs both.
    "stacked_loras": [
        BASE,
        (2, "LoadLoRA", (40, 280), {"lora_name": STAR}, {}),
        (3, "LoadLoRA", (40, 440), {"lora_name": CYAN}, {}),
        (
            4,
            "ApplyLoRA",
            (400, 80),
            {"strength_unet": 1.0, "strength_text_encoder": 1.0},
            {"base": (1, 0), "lora": (2, 0)},
        ),
        (
            5,
            "ApplyLoRA",
            (400, 320),
            {"strength_unet": 1.0, "strength_text_encoder": 1.0},
            {"base": (4, 0), "lora": (3, 0)},
        ),
        (
            6,
            "Sampler",
            (760, 80),
            {"prompt": "a large cyan star at the top left, yellow background", **SAMPLE},
            {"base": (5, 0)},
        ),
        (7, "SaveImage", (1120, 80), {"filename_prefix": "loom_stacked"}, {"images": (6, 0)}),
    ],
    # The star fused into the base and saved as a checkpoint, then the cyan LoRA applied on top of it.
    "fuse_and_save": [
        BASE,
        (2, "LoadLoRA", (40, 280), {"lora_name": STAR}, {}),
        (
            3,
            "ApplyLoRA",
            (400, 120),
            {"strength_unet": 1.0, "strength_text_encoder": 1.0},
            {"base": (1, 0), "lora": (2, 0)},
        ),
        (4, "FuseLoRA", (760, 120), {"save_name": "loom-fused-star", "save_fp16": False}, {"base": (3, 0)}),
        (5, "LoadLoRA", (760, 340), {"lora_name": CYAN}, {}),
        (
            6,
            "ApplyLoRA",
            (1120, 120),
            {"strength_unet": 1.0, "strength_text_encoder": 1.0},
            {"base": (4, 0), "lora": (5, 0)},
        ),
        (
            7,
            "Sampler",
            (1480, 80),
            {"prompt": "a large cyan star in the centre, white background", **SAMPLE},
            {"base": (6, 0)},
        ),
        (8, "SaveImage", (1840, 80), {"filename_prefix": "loom_fused"}, {"images": (7, 0)}),
    ],
    # The same prompt and seeds with the star LoRA at strength 0 (the base: it never saw a star) and 1.
    "ab_strength": [
        BASE,
        (2, "LoadLoRA", (40, 280), {"lora_name": STAR}, {}),
        (
            3,
            "ApplyLoRA",
            (400, 40),
            {"strength_unet": 0.0, "strength_text_encoder": 0.0},
            {"base": (1, 0), "lora": (2, 0)},
        ),
        (
            4,
            "ApplyLoRA",
            (400, 520),
            {"strength_unet": 1.0, "strength_text_encoder": 1.0},
            {"base": (1, 0), "lora": (2, 0)},
        ),
        (
            5,
            "Sampler",
            (760, 40),
            {"prompt": "a large yellow star on the right, black background", **SAMPLE},
            {"base": (3, 0)},
        ),
        (
            6,
            "Sampler",
            (760, 520),
            {"prompt": "a large yellow star on the right, black background", **SAMPLE},
            {"base": (4, 0)},
        ),
        (7, "SaveImage", (1120, 40), {"filename_prefix": "loom_ab_strength0"}, {"images": (5, 0)}),
        (8, "SaveImage", (1120, 520), {"filename_prefix": "loom_ab_strength1"}, {"images": (6, 0)}),
    ],
}

# TrainLoRA on a built-in toy-world set (the shape `star`, which the base never saw), then the LoRA at five
# strengths, one column each, with the same seed: the grid shows what strength does (column 0 is the base).
STAR_PROMPT = "a large red star in the centre, blue background"
TRAIN = dict(
    dataset_dir="toy-star (built-in)",
    rank=16,
    alpha=16.0,
    steps=300,
    learning_rate=0.001,
    resolution=64,
    seed=0,
    output_name="toy-star-trained",
)
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_APPLY, _SAMPLE, _GRID = 4, 4 + len(STRENGTHS), 4 + 2 * len(STRENGTHS)
WORKFLOWS_BY_NAME["train_then_apply"] = [
    BASE,
    (2, "TrainLoRA", (400, 40), TRAIN, {"base": (1, 0)}),
    (3, "SaveImage", (400, 900), {"filename_prefix": "train_then_apply/loss_curve"}, {"images": (2, 2)}),
    *(
        (
            _APPLY + k,
            "ApplyLoRA",
            (800, 40 + 160 * k),
            {"strength_unet": strength, "strength_text_encoder": strength},
            {"base": (1, 0), "lora": (2, 0)},
        )
        for k, strength in enumerate(STRENGTHS)
    ),
    *(
        (
            _SAMPLE + k,
            "Sampler",
            (1160 + 40 * k, 40 + 160 * k),
            {"prompt": STAR_PROMPT, **SAMPLE},
            {"base": (_APPLY + k, 0)},
        )
        for k in range(len(STRENGTHS))
    ),
    (
        _GRID,
        "LoomImageGrid",
        (1760, 40),
        {
            "row_labels": "\n".join(f"strength {strength:g}" for strength in STRENGTHS),
            "upscale": 3,
            "layout": "batch per column",
        },
        {f"row_{k + 1}": (_SAMPLE + k, 0) for k in range(len(STRENGTHS))},
    ),
    (_GRID + 1, "SaveImage", (2120, 40), {"filename_prefix": "train_then_apply/strength_grid"}, {"images": (_GRID, 0)}),
]


def main() -> None:
    for name, nodes in WORKFLOWS_BY_NAME.items():
        with open(WORKFLOWS / f"{name}.json", "w") as f:
            json.dump(build(nodes, name.replace("_", " ")), f, indent=1)
            f.write("\n")
        print(f"wrote workflows/{name}.json")


if __name__ == "__main__":
    main()
