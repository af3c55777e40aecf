"""Make a tiny Qwen3 model with random weights and a locally trained tokenizer. No hub access.

Runs inside the simulated nodes' image build (its venv has transformers and tokenizers).
Usage: make_tiny_model.py OUT_DIR
"""

import glob
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

out = sys.argv[1]
torch.manual_seed(0)

# byte-level BPE trained on Python's own standard library sources: any local text will do
files = sorted(glob.glob("/usr/lib/python3*/**/*.py", recursive=True))[:400]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]
tok.train(files, trainers.BpeTrainer(vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

chat_template = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] if message['content'] is string else '') + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    unk_token=None,
)
fast.chat_template = chat_template
fast.save_pretrained(out)

config = Qwen3Config(
    vocab_size=len(fast),
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    bos_token_id=fast.bos_token_id,
    eos_token_id=fast.eos_token_id,
    pad_token_id=fast.pad_token_id,
    torch_dtype="float32",
)
model = Qwen3ForCausalLM(config)
model.save_pretrained(out, safe_serialization=True)
print(f"tiny model: {sum(p.numel() for p in model.parameters())} parameters in {out}")
