"""Our chat template (model/data/chat.py) in the template languages other runtimes apply.

A chat-trained model is only useful elsewhere if the runtime lays a conversation out as
training did. Two spellings of the same text, built from chat.py's headers and turn end so
they cannot drift from it:

    jinja_chat_template()   Jinja, as transformers (tokenizer_config.json's chat_template),
                            llama.cpp and llama-cpp-python (GGUF's tokenizer.chat_template)
                            apply it, with the variables they pass (messages,
                            add_generation_prompt)
    ollama_template()       Go's text/template, as an Ollama Modelfile's TEMPLATE

Both render exactly the text of `render_chat` (tests compare them over many conversations).
The runtimes then tokenize that text in one piece, with end-of-text parsed as the special
token; `render_chat` encodes each header and turn on its own, so a BPE vocabulary can cut the
whitespace at a turn's end differently (docs/export.md gives the count).
"""

from __future__ import annotations

from model.data.chat import HEADERS, ROLE_ALIASES, TURN_END
from model.data.tokenizer import EOT_TEXT


def _jinja_string(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def jinja_chat_template() -> str:
    """The chat template in Jinja: end-of-text, then each turn, then (with
    add_generation_prompt) the assistant's header; an unknown role is an error, as in ours."""
    eot = _jinja_string(EOT_TEXT)
    system_roles = ["system", *(alias for alias, role in ROLE_ALIASES.items()
                                if role == "system")]
    turns = (
        "{%- if message['role'] == 'assistant' %}"
        f"{{{{ {_jinja_string(HEADERS['assistant'] + ' ')} + message['content'] + {eot} }}}}"
        f"{{%- elif message['role'] in {system_roles!r} %}}"
        f"{{{{ {_jinja_string(HEADERS['system'] + ' ')} + message['content'] + "
        f"{_jinja_string(TURN_END)} }}}}"
        "{%- elif message['role'] == 'user' %}"
        f"{{{{ {_jinja_string(HEADERS['user'] + ' ')} + message['content'] + "
        f"{_jinja_string(TURN_END)} }}}}"
        "{%- else %}"
        "{{ raise_exception('a message role must be system, user or assistant') }}"
        "{%- endif %}"
    )
    return (f"{{{{ {eot} }}}}{{%- for message in messages %}}{turns}{{%- endfor %}}"
            f"{{%- if add_generation_prompt %}}{{{{ {_jinja_string(HEADERS['assistant'])} }}}}"
            "{%- endif %}")


def ollama_template() -> str:
    """The chat template as an Ollama Modelfile's TEMPLATE (Go text/template): the messages
    of /api/chat, or a /api/generate prompt taken as one user turn, then the assistant's
    header. Text outside {{ }} is literal, newlines included."""
    assistant, system, user = HEADERS["assistant"], HEADERS["system"], HEADERS["user"]
    return (
        f"{EOT_TEXT}{{{{ if .Messages }}}}{{{{ range .Messages }}}}"
        f'{{{{ if eq .Role "assistant" }}}}{assistant} {{{{ .Content }}}}{EOT_TEXT}'
        f'{{{{ else if eq .Role "system" }}}}{system} {{{{ .Content }}}}{TURN_END}'
        f"{{{{ else }}}}{user} {{{{ .Content }}}}{TURN_END}{{{{ end }}}}{{{{ end }}}}"
        f"{{{{ else }}}}{{{{ if .System }}}}{system} {{{{ .System }}}}{TURN_END}{{{{ end }}}}"
        f"{user} {{{{ .Prompt }}}}{TURN_END}{{{{ end }}}}{assistant}"
    )
