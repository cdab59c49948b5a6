"""Long-context tasks every peer reports, as pure building blocks (no model, no torch):

- `haystack`: needle-in-a-haystack samples, seeded and offline, at chosen depths and token lengths;
- `ruler`: a RULER subset (multi-key and multi-value NIAH, variable tracking, common-words extraction);
- `scoring`: the benchmarks' own per-sample metrics (RULER string match, LongBench, InfiniteBench, LooGLE);
- `loaders`: LongBench, InfiniteBench and LooGLE through `datasets.load_dataset`, as uniform samples.

Lengths are token targets under a caller-supplied counter `count(text) -> int`, so one generator serves
every tokenizer; a task assembles the prompt parts with its prompter and scores the output with `scoring`
(`scoring.score(metric, prediction, answers)`, the metric named by the sample). ROUGE needs the
`rouge-score` package (0.1.2), imported only when a ROUGE metric is first used.
"""
