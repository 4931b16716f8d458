# Corpus: text tokenized into data/tokens/{corpus}.h5 (int32 [n_seq, ctx_len]).


def corpus_args(wildcards):
    """Command-line arguments describing a corpus (every knob, so a change reruns the job)."""
    c = config["corpora"][wildcards.corpus]
    args = [
        f"--source {c['source']}",
        f"--tokenizer {model_path(c['tokenizer'])}",
        f"--ctx-len {c['ctx_len']} --n-seq {c['n_seq']} --seed {c['seed']}",
        "--prepend-bos" if c["prepend_bos"] else "--no-prepend-bos",
        f"--split {c['split']} --eval-fraction {c['eval_fraction']}",
    ]
    if c["source"] == "hf":
        hf = c["hf"]
        args.append(f"--hf-path {hf['path']} --hf-split {hf.get('split', 'train')}")
        args.append(f"--hf-text-field {hf.get('text_field', 'text')}")
        if hf.get("name"):
            args.append(f"--hf-name {hf['name']}")
    return " ".join(args)


rule tokenize:
    input:
        model=corpus_model_input,
    output:
        tokens="data/tokens/{corpus}.h5",
    params:
        args=corpus_args,
        code=code_version("data"),
    log:
        "logs/tokenize/{corpus}.log",
    benchmark:
        "benchmarks/tokenize/{corpus}.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m saeflow.data {params.args} --out {output.tokens} > {log} 2>&1"
