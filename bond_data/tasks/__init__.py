"""Built-in tasks: tiny models and verifiable rewards built in code, nothing downloaded.

    common.py   tokenizer, tiny Llama, pretraining loop, build-once cache, sampling statistics
    tiny.py     letter sorting: discrete edit-distance reward, many ties (the demo's task)
    digits.py   digit strings read as a fraction: a continuous reward, the exact Best-of-N law
"""
