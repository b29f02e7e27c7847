"""The command layer: one argparse `main(argv, prog)` per `pakar` command, grouped by pipeline stage.

    data.py       tokenizer, prepare          evaluate.py   eval, eval-rag
    info.py       info                        chat.py       chat, chat-batch
    train.py      train, finetune, lora-merge hf.py         export, import
    serve.py      serve                       retrieval.py  index, search
    report.py     report
    common.py     parser pieces shared by chat, chat-batch and serve

The rule: a command module imports only the standard library and light pakar modules (pakar.args,
pakar.config, pakar.corpus, pakar.info) at its top; it builds the parser, parses, checks the flags,
and then imports the library module that does the work (each such import marked `# lazy:`). The
library takes typed arguments (pakar.args dataclasses, keyword arguments), never a namespace; the
namespace stays here. Imports run one way: commands -> pipeline stages (train, finetune, evaluate,
chat, serve, hf, retrieval, rag) -> model/data -> config (tests/test_layout.py checks the graph).
"""
