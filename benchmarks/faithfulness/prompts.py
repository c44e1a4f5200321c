"""The chat prompts of the comparison (30 to ~3,000 tokens with SmolLM2's template), built deterministically."""
import random

# --------------------------------------------------------------------------------------------
# Pools of hand-written sentences; each long prompt draws from its own pool with its own seed.
# --------------------------------------------------------------------------------------------
GEOLOGY = [
    "Basalt forms when lava rich in iron and magnesium cools quickly near the surface.",
    "Granite, by contrast, cools slowly deep underground, which lets large crystals grow.",
    "Sedimentary layers record the slow settling of sand, silt and the shells of tiny animals.",
    "Limestone caves are carved by rainwater that has picked up a little carbon dioxide from the soil.",
    "Glaciers drag boulders for hundreds of kilometres and drop them in fields far from their source.",
    "A river delta grows outward each year as the current slows and lets its load of mud fall.",
    "Earthquakes cluster along the edges of tectonic plates, where rock sticks and then slips.",
    "Volcanic ash can travel around the globe and cool the climate for a year or two.",
    "Quartz is so common in beach sand because it resists weathering better than most minerals.",
    "Fossils are most often found in shale, which preserves fine detail in its thin layers.",
    "Mountain ranges rise where plates collide, and erosion begins wearing them down at once.",
    "Geysers need a supply of groundwater, a heat source and a narrow plumbing system of cracks.",
]
KITCHEN = [
    "Bread dough rises because yeast eats sugar and releases bubbles of carbon dioxide.",
    "A pinch of salt in caramel sharpens the sweetness rather than hiding it.",
    "Searing meat does not seal in juices, but it does build a flavourful brown crust.",
    "Rice should rest for a few minutes after cooking so the moisture spreads evenly.",
    "Cold butter makes flaky pastry because it melts into steam pockets in the oven.",
    "Onions turn sweet when cooked slowly, as their sugars caramelise over low heat.",
    "Acid from lemon juice keeps sliced apples from browning for a while.",
    "Fresh herbs are best added at the end, while dried herbs need time to release flavour.",
    "A heavy pan holds heat, so the temperature drops less when food goes in.",
    "Whisking egg whites in a copper bowl gives a more stable foam.",
    "Stock made from roasted bones is darker and richer than stock from raw ones.",
    "Letting a steak rest lets the fibres relax and reabsorb some of their liquid.",
]
HARBOUR_LOG = [
    "The morning tide came in an hour later than the almanac predicted.",
    "Two fishing boats returned early because of fog near the northern buoy.",
    "The crane on pier three was repaired and tested with a load of empty crates.",
    "A cargo ship from the south unloaded timber, flour and forty barrels of oil.",
    "The harbour master noted that the lighthouse lamp flickered twice after midnight.",
    "Gulls gathered around the fish market until the stalls were washed down at noon.",
    "A small yacht asked for a berth for three nights and paid in advance.",
    "The pilot boat guided a tanker through the channel without any trouble.",
    "Rain started in the afternoon and the loading of grain was postponed.",
    "Divers inspected the sea wall and found two loose stones near the east steps.",
    "The ferry to the island ran on schedule despite a strong crosswind.",
    "A shipment of ropes and nets was stored in warehouse B until Tuesday.",
]
TOWN_FACTS_FIRST = ["Ashford", "Brindlewick", "Calloway", "Dunmere", "Elderglen", "Farrowby", "Greystone", "Holloway"]
MAYORS = ["Ingrid Solberg", "Marcus Bellamy", "Priya Raman", "Tomasz Wolski", "Helen Okafor", "Diego Navarro",
          "Yuki Tanaka", "Fiona McBride"]
TOWN_FILLER = [
    "The town holds a market every Saturday in the square beside the old church.",
    "Its railway station was rebuilt after a fire and now has a glass roof.",
    "Most residents work in farming, small workshops or the regional hospital.",
    "A narrow stone bridge crosses the river at the centre of town.",
    "The local school has won several prizes for its choir and its chess club.",
    "In winter the hills around the town attract walkers and a few skiers.",
    "A museum near the town hall displays tools used by the first settlers.",
    "The annual harvest festival ends with a lantern parade along the river.",
    "Several bakeries compete for the title of best rye bread in the county.",
    "The town library keeps a collection of maps more than two hundred years old.",
]
FIRST_NAMES = ["Ada", "Bruno", "Chloe", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Imani", "Jonas", "Kira", "Luis",
               "Mona", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tess", "Umar", "Vera", "Wes", "Xenia",
               "Yara", "Zane"]
LAST_NAMES = ["Abbott", "Berg", "Costa", "Duval", "Engel", "Fischer", "Garcia", "Horvat", "Ito", "Jensen", "Kovacs",
              "Lind", "Moreau", "Novak", "Ortiz", "Petrov", "Quist", "Rossi", "Silva", "Tanaka", "Ueda", "Varga"]
DEPARTMENTS = ["Finance", "Logistics", "Research", "Legal", "Marketing", "Support", "Security", "Design"]
CITIES = ["Lisbon", "Oslo", "Krakow", "Lyon", "Porto", "Ghent", "Tartu", "Bergen", "Brno", "Turin"]


def _paragraphs(rng, pool, n_paragraphs, sentences_per):
    out = []
    for _ in range(n_paragraphs):
        out.append(" ".join(rng.choice(pool) for _ in range(sentences_per)))
    return out


def build_prompts():
    """name -> list of chat messages."""
    prompts = {}

    # 1. ~35 tokens: a short factual question.
    prompts["short_fact"] = [{"role": "user", "content": "Name the three primary colors of paint."}]

    # 2. multi-turn with a system message (~110 tokens).
    prompts["multi_turn"] = [
        {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
        {"role": "user", "content": "I have a cat called Pepper and a dog called Miso."},
        {"role": "assistant", "content": "Nice, Pepper and Miso sound like a fun pair."},
        {"role": "user", "content": "Which of my pets is the dog, and what is the cat's name?"},
    ]

    # 3. a short story and a question (~330 tokens).
    story = (
        "Marta ran the lighthouse on Gull Rock for eleven years. Every evening she climbed the ninety-two steps, "
        "wiped the salt from the great lens and lit the lamp before the sun touched the water. Her brother Anton "
        "brought supplies by boat on the first Monday of each month: paraffin, flour, coffee and a bundle of "
        "newspapers that were always two weeks old. One stormy October the boat did not come. Marta rationed the "
        "paraffin, burning the lamp only during the darkest hours, and wrote each night's weather in a green "
        "notebook. On the ninth day a fishing trawler called the Northern Wren anchored in the lee of the rock. "
        "Its captain, a quiet man named Ivo, rowed across with two cans of fuel and a letter from Anton, who had "
        "broken his arm on the quay. Marta kept the letter inside the green notebook for the rest of her life. "
        "When the lighthouse was automated many years later, the notebook was found on the shelf beside the lens, "
        "and the letter was still folded inside it."
    )
    prompts["story_qa"] = [{"role": "user", "content": story + "\n\nQuestion: Who brought the fuel during the storm, "
                                                          "and what was the name of his boat?"}]

    # 4. key-value lookup (~800 tokens).
    rng = random.Random(4)
    keys = ["".join(rng.choice("0123456789abcdef") for _ in range(8)) for _ in range(45)]
    values = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6)) for _ in range(45)]
    target = 29
    lines = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
    prompts["kv_lookup"] = [{"role": "user", "content": "Below is a list of keys and their values.\n\n" + lines +
                             f"\n\nWhat is the value for the key {keys[target]}? Answer with the value only."}]

    # 5. needle inside geology filler (~1,300 tokens).
    rng = random.Random(5)
    paras = _paragraphs(rng, GEOLOGY, 12, 5)
    paras.insert(5, "The secret passphrase for the museum vault is amber-falcon-42.")
    prompts["needle_filler"] = [{"role": "user", "content": "\n\n".join(paras) +
                                 "\n\nWhat is the secret passphrase for the museum vault?"}]

    # 6. several documents about towns, one question (~1,900 tokens).
    rng = random.Random(6)
    docs = []
    for i, (town, mayor) in enumerate(zip(TOWN_FACTS_FIRST, MAYORS)):
        body = " ".join(rng.choice(TOWN_FILLER) for _ in range(8))
        year = 1400 + 37 * i + rng.randrange(30)
        population = 2000 + rng.randrange(40000)
        docs.append(f"Document {i + 1}: {town}\n{town} was founded in {year} and has a population of about "
                    f"{population}. The current mayor is {mayor}. {body}")
    prompts["multi_doc"] = [{"role": "user", "content": "Read the documents and answer the question.\n\n" +
                             "\n\n".join(docs) + "\n\nQuestion: Who is the mayor of Brindlewick?"}]

    # 7. a CSV table of employee records (~2,400 tokens).
    rng = random.Random(7)
    rows = ["id,first_name,last_name,department,city"]
    for i in range(1000, 1110):
        rows.append(f"{i},{rng.choice(FIRST_NAMES)},{rng.choice(LAST_NAMES)},{rng.choice(DEPARTMENTS)},{rng.choice(CITIES)}")
    prompts["records_table"] = [{"role": "user", "content": "Here is an employee table in CSV format:\n\n" +
                                 "\n".join(rows) + "\n\nIn which department and city does employee 1043 work?"}]

    # 8. a long harbour log with a needle near the start (~3,000 tokens).
    rng = random.Random(8)
    entries = []
    for day in range(1, 58):
        sentences = " ".join(rng.choice(HARBOUR_LOG) for _ in range(3))
        entries.append(f"Day {day}. {sentences}")
    entries.insert(3, "Day 3 (addendum). The access code for the east gate was changed to 5812.")
    prompts["long_needle"] = [{"role": "user", "content": "Harbour log\n\n" + "\n".join(entries) +
                               "\n\nAccording to the log, what is the access code for the east gate?"}]

    # 9. kitchen notes with an instruction at the top (~900 tokens).
    rng = random.Random(9)
    notes = _paragraphs(rng, KITCHEN, 8, 4)
    notes.insert(2, "Note from the head chef: the soup of the day on Friday is roasted pumpkin with sage.")
    prompts["kitchen_notes"] = [{"role": "user", "content": "Summarise in one sentence what the head chef said "
                                 "about Friday, using these kitchen notes.\n\n" + "\n\n".join(notes)}]
    return prompts


HEADS = [(14, 3), (15, 4), (16, 1), (17, 7), (18, 2), (19, 5), (20, 1), (21, 7), (12, 6), (13, 0), (22, 3), (23, 8),
         (11, 4), (24, 2), (10, 5), (25, 6)]

# name -> knobs (intervention_warmup "auto" is resolved by our Decoder and, independently, by the published rule).
SETTINGS = {
    "a_defaults": dict(strength=2.0, top_p=0.975, top_k=4096, decay=0.75, context_warmup=8,
                       intervention_warmup="auto", selection="dynamic"),
    "b_s3_p06_k32": dict(strength=3.0, top_p=0.6, top_k=32, decay=0.5, context_warmup=4,
                         intervention_warmup="auto", selection="dynamic"),
    "c_hard": dict(strength=99.0, top_p=0.9, top_k=64, decay=0.75, context_warmup=8,
                   intervention_warmup="auto", selection="dynamic"),
    "d_static": dict(strength=2.0, top_p=0.975, top_k=4096, decay=0.75, context_warmup=8,
                     intervention_warmup="auto", selection="static"),
    "e_iw0": dict(strength=2.0, top_p=0.975, top_k=4096, decay=0.75, context_warmup=8,
                  intervention_warmup=0, selection="dynamic"),
    "f_iw2": dict(strength=2.5, top_p=0.8, top_k=128, decay=0.6, context_warmup=6,
                  intervention_warmup=2, selection="dynamic"),
    "g_hard_static": dict(strength=99.0, top_p=0.95, top_k=16, decay=0.75, context_warmup=8,
                          intervention_warmup="auto", selection="static"),
    "h_k8_s4": dict(strength=4.0, top_p=0.99, top_k=8, decay=0.9, context_warmup=12,
                    intervention_warmup="auto", selection="dynamic"),
}
