# Corpus: text tokenized into data/tokens/{corpus}.h5 (int32 [n_seq, ctx_len]).
# Its helper function corpus_args is in common.smk.


rule tokenize:
    input:
        model=corpus_model_input,
    output:
        tokens="data/tokens/{corpus}.h5",
    log:
        "logs/tokenize/{corpus}.log",
    benchmark:
        "benchmarks/tokenize/{corpus}.tsv"
    conda:
        "../../envs/saeflow.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        args=corpus_args,
        code=code_version("data"),
    shell:
        "python -m saeflow.data {params.args} --out {output.tokens} > {log} 2>&1"
