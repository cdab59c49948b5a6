"""Writes the paper-shaped smoke run's local datasets (config/paper_smoke.yaml), each in its hub dataset's
own layout so that `datasets.load_dataset(path, name, split=...)` reads it exactly as the hub copy:
a folder whose README.md declares the configs (`configs:` with `config_name` and `data_files`, as
the hub's converted datasets do) and JSON-lines files with the hub's columns.

    iwslt2017/  configs iwslt2017-en-fr, iwslt2017-en-de; split test; column translation {en, fr|de}
    wikitext/   config wikitext-103-raw-v1; split test; column text (" = Heading = " rows, blank rows)
    pg19/       default config; split test; short_book_title, publication_date, url, text (one book a row)
    longbench/  one config per subset (qasper, hotpotqa, gov_report, trec, passage_retrieval_en, lcc); split
                test; input, context, answers, length, dataset, language, all_classes, _id (THUDM/LongBench)

The sentences are generated here from small seeded templates (the words of "fr" and "de" are a
word-for-word substitution, not a translation): only the layout is real, and the random-weight smoke
models read them as bytes. Run from anywhere: python tests/data/paper/make_fixtures.py
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SUBJ = ["the cat", "a river", "my brother", "the old house", "this city", "the small boat", "her teacher",
        "the garden", "our neighbour", "the last train"]
VERB = ["sees", "follows", "remembers", "crosses", "finds", "paints", "leaves", "waits for", "opens", "hears"]
OBJ = ["the bridge", "a letter", "the morning", "the blue door", "a quiet street", "the forest", "the market",
       "an open window", "the winter", "a long road"]
TAIL = ["", " before dawn", " every day", " in the rain", " without a word", " near the sea"]
# word-for-word substitutes (not translations: only the layout matters here)
FR = {"the": "le", "a": "un", "my": "mon", "this": "cette", "her": "sa", "our": "notre", "an": "une",
      "cat": "chat", "river": "fleuve", "brother": "frere", "old": "vieille", "house": "maison", "city": "ville",
      "small": "petit", "boat": "bateau", "teacher": "professeur", "garden": "jardin", "neighbour": "voisin",
      "last": "dernier", "train": "train", "sees": "voit", "follows": "suit", "remembers": "se souvient de",
      "crosses": "traverse", "finds": "trouve", "paints": "peint", "leaves": "quitte", "waits": "attend",
      "for": "pour", "opens": "ouvre", "hears": "entend", "bridge": "pont", "letter": "lettre",
      "morning": "matin", "blue": "bleue", "door": "porte", "quiet": "calme", "street": "rue",
      "forest": "foret", "market": "marche", "open": "ouverte", "window": "fenetre", "winter": "hiver",
      "long": "longue", "road": "route", "before": "avant", "dawn": "l'aube", "every": "chaque", "day": "jour",
      "in": "sous", "rain": "pluie", "without": "sans", "word": "mot", "near": "pres de", "sea": "mer"}
DE = {k: v for k, v in zip(FR, ["der", "ein", "mein", "diese", "ihr", "unser", "ein", "Katze", "Fluss", "Bruder",
                                "alte", "Haus", "Stadt", "kleine", "Boot", "Lehrer", "Garten", "Nachbar",
                                "letzte", "Zug", "sieht", "folgt", "erinnert sich an", "überquert", "findet",
                                "malt", "verlässt", "wartet", "auf", "öffnet", "hört", "Brücke", "Brief",
                                "Morgen", "blaue", "Tür", "ruhige", "Straße", "Wald", "Markt", "offenes",
                                "Fenster", "Winter", "lange", "Straße", "vor", "Tagesanbruch", "jeden", "Tag",
                                "im", "Regen", "ohne", "Wort", "nahe", "Meer"])}


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(OBJ)}{rng.choice(TAIL)}."


def substitute(en: str, table: dict) -> str:
    words = en.rstrip(".").split()
    return " ".join(table.get(w, w) for w in words).capitalize() + "."


def write(folder: str, card: str, files: dict[str, list[dict]]) -> None:
    os.makedirs(os.path.join(HERE, folder), exist_ok=True)
    with open(os.path.join(HERE, folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    for rel, rows in files.items():
        path = os.path.join(HERE, folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    rng = random.Random(0)
    iwslt = {}
    for tgt, table in (("fr", FR), ("de", DE)):
        pairs = [sentence(rng).capitalize() for _ in range(300)]
        iwslt[f"iwslt2017-en-{tgt}/test.jsonl"] = [
            {"translation": {"en": en, tgt: substitute(en.lower(), table)}} for en in pairs]
    write("iwslt2017", "---\nconfigs:\n"
          "- config_name: iwslt2017-en-fr\n  data_files:\n  - split: test\n    path: iwslt2017-en-fr/test.jsonl\n"
          "- config_name: iwslt2017-en-de\n  data_files:\n  - split: test\n    path: iwslt2017-en-de/test.jsonl\n"
          "---\nLayout of IWSLT/iwslt2017 (smoke data, generated by ../make_fixtures.py).\n", iwslt)
    rows = []
    for article in range(12):
        rows += [{"text": ""}, {"text": f" = Article {article} = "}, {"text": ""}]
        for _ in range(4):
            rows.append({"text": " " + " ".join(sentence(rng).capitalize() for _ in range(6)) + " "})
    write("wikitext", "---\nconfigs:\n- config_name: wikitext-103-raw-v1\n  data_files:\n  - split: test\n"
          "    path: wikitext-103-raw-v1/test.jsonl\n---\nLayout of Salesforce/wikitext (smoke data).\n",
          {"wikitext-103-raw-v1/test.jsonl": rows})
    books = [{"short_book_title": f"Book {i}", "publication_date": 1900 + i, "url": f"https://example.org/{i}",
              "text": "\n\n".join(" ".join(sentence(rng).capitalize() for _ in range(8)) for _ in range(12))}
             for i in range(4)]
    write("pg19", "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n    path: data/test.jsonl\n"
          "---\nLayout of deepmind/pg19 (smoke data).\n", {"data/test.jsonl": books})

    longbench(random.Random(1))


LB_SUBSETS = ("qasper", "hotpotqa", "gov_report", "trec", "passage_retrieval_en", "lcc")
TREC_CLASSES = ["Description", "Entity", "Abbreviation", "Human being", "Location", "Numeric value"]


def longbench(rng: random.Random) -> None:
    """Two rows per subset in LongBench's layout; contexts of 1-6k bytes, so that the smoke run's scaled
    lengths cut some of them in the middle (the random-weight twins read bytes)."""
    def text(n: int) -> str:
        return " ".join(sentence(rng).capitalize() for _ in range(n))

    files = {}
    for sub in LB_SUBSETS:
        rows = []
        for i in range(2):
            n = rng.choice([30, 120])
            fact = f"The keeper of the north tower is called Ilse Marn{i}."
            if sub in ("qasper", "hotpotqa"):
                ctx = (text(n // 2) + " " + fact + " " + text(n // 2)) if sub == "qasper" else \
                    "\n".join(f"Passage {j + 1}:\n" + (fact if j == 1 else text(n // 4)) for j in range(4))
                inp, ans, classes = "Who keeps the north tower?", [f"Ilse Marn{i}"], None
            elif sub == "gov_report":
                ctx, inp, ans, classes = text(n), "", [text(3)], None
            elif sub == "trec":
                ctx = "\n".join(f"Question: What is {rng.choice(OBJ)}?\nType: {rng.choice(TREC_CLASSES)}"
                                for _ in range(n // 6))
                inp, ans, classes = "Question: Who paints the blue door?\nType:", ["Human being"], TREC_CLASSES
            elif sub == "passage_retrieval_en":
                paras = [text(n // 6) for _ in range(6)]
                ctx = "\n\n".join(f"Paragraph {j + 1}: {p}" for j, p in enumerate(paras))
                inp, ans, classes = paras[2][:80], ["Paragraph 3"], None
            else:  # lcc: code, then the next line
                ctx = "\n".join(f"def f{j}(x):\n    return x * {j} + {rng.randrange(9)}" for j in range(n // 3)) + "\n"
                inp, ans, classes = "", [f"def f{n // 3}(x):"], None
            rows.append({"input": inp, "context": ctx, "answers": ans, "length": len(ctx.split()), "dataset": sub,
                         "language": "en", "all_classes": classes, "_id": f"smoke-{sub}-{i}"})
        files[f"data/{sub}.jsonl"] = rows
    card = "---\nconfigs:\n" + "".join(f"- config_name: {s}\n  data_files:\n  - split: test\n    path: data/{s}.jsonl\n"
                                      for s in LB_SUBSETS)
    write("longbench", card + "---\nLayout of THUDM/LongBench (smoke data, generated by ../make_fixtures.py).\n", files)


if __name__ == "__main__":
    main()
