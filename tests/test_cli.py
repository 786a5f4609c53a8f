"""genjo-fast chat: multi-turn answers through a pipe and on a pseudo-terminal (drawn in place),
the conversation as the reference's chat.py carries it, and bad input reported without the
chat dying. The model is a tiny random LLaDA checkpoint with an in-process tokenizer; the
expected answers come from the same model run in this process."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genjo_fast.chat import ChatError, Conversation, Reply, Settings, load_chat_model

from chat_helpers import (EOS_ID, EOT_ID, MASK_ID, char_tokenizer, save_checkpoint,
                          save_dream_checkpoint, tiny_llada)

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "genjo_fast.cli", "chat", "--threads", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("tiny-chat-checkpoint"))


@pytest.fixture(scope="module")
def chat(checkpoint):
    return load_chat_model(str(checkpoint), device="cpu")


def answers(chat, messages, settings=Settings()):
    """The answers a conversation gives, in this process."""
    conversation = Conversation(chat)
    out = []
    for message in messages:
        *_, reply = conversation.reply(message, settings)
        out.append(reply.text)
    return out


def run(checkpoint, stdin, *flags, timeout=300):
    return subprocess.run(COMMAND + ["--model", str(checkpoint), *flags], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


# -- the conversation, in-process ------------------------------------------------------------

def test_conversation_carries_the_history_as_chat_py_does(chat):
    tokenizer = chat.tokenizer
    conversation = Conversation(chat)
    *updates, first = conversation.reply("Sort: 3 1 2", Settings(gen_length=16, steps=16))
    assert isinstance(first, Reply) and updates and updates[-1].done
    assert first.forwards == 16 and len(first.ids) == 16 and first.seconds > 0
    turn1 = tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Sort: 3 1 2"}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert turn1[0] == tokenizer.bos_token_id
    # the first turn: the template's ids (BOS first), then the answer without EOS ids
    kept = [t for t in first.ids if t not in (EOS_ID, MASK_ID)]
    assert conversation.turns == [turn1[1:] + kept]
    prompt, turn, dropped = conversation.prompt("Reverse: abc", 16)
    turn2 = tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse: abc"}], tokenize=False,
        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    # the next prompt: BOS, the first turn, then the new message without its BOS
    assert prompt == turn1 + kept + turn2[1:] and turn == turn2[1:] and dropped == 0
    # the reply is the sampler's answer to exactly that prompt
    out = genjo_fast_generate(chat, prompt, 16)
    *_, second = conversation.reply("Reverse: abc", Settings(gen_length=16, steps=16))
    assert second.ids == out


def genjo_fast_generate(chat, prompt, gen_length):
    import genjo_fast
    x = torch.tensor([prompt])
    out = genjo_fast.generate(chat.model, x, steps=gen_length, gen_length=gen_length,
                              block_length=8, mask_id=MASK_ID, eos_id=EOS_ID, eot_id=EOT_ID)
    return out[0, x.shape[1]:].tolist()


def test_old_turns_are_dropped_to_fit_the_context(tmp_path):
    tokenizer = char_tokenizer()
    from genjo_fast.chat import chat_model
    chat = chat_model(tiny_llada(tokenizer, context=120), tokenizer, "llada", "small")
    conversation = Conversation(chat)
    settings = Settings(gen_length=32, steps=8)
    *_, reply = conversation.reply("x" * 30, settings)
    assert reply.dropped_turns == 0
    *_, reply = conversation.reply("y" * 30, settings)  # 1 + 2 turns of ~60 + 32 > 120
    assert reply.dropped_turns == 1 and len(conversation.turns) == 1
    with pytest.raises(ChatError, match="message too long: it takes .* context of 120"):
        next(conversation.reply("z" * 100, settings))
    assert len(conversation.turns) == 1  # unchanged
    with pytest.raises(ChatError, match="empty message"):
        next(conversation.reply("  ", settings))


def test_settings_of_the_other_family_and_bad_constraints_are_refused(chat):
    conversation = Conversation(chat)
    with pytest.raises(ChatError, match="alg is not an option of LLaDA"):
        next(conversation.reply("hi", Settings(alg="entropy")))
    with pytest.raises(ChatError, match="constraint 'x': write position:word"):
        next(conversation.reply("hi", Settings(constraints="x")))
    with pytest.raises(ValueError, match="constraints"):  # past the answer's 32 positions
        list(conversation.reply("hi", Settings(constraints="40:a")))
    assert conversation.turns == []


def last_reply(chat, message, settings):
    *_, reply = Conversation(chat).reply(message, settings)
    return reply


def test_constraints_stop_at_eos_and_the_app_sampler_reach_the_sampler(chat):
    """The LLaDA options the reference app has: constraints are kept in the answer; stopping
    at EOS gives the same answer in fewer forwards (or as many, if the answer fills the
    length); the app's sampler runs."""
    plain = last_reply(chat, "Sort: 3 1 2", Settings())
    word = chat.tokenizer(" zq", add_special_tokens=False)["input_ids"]
    constrained = last_reply(chat, "Sort: 3 1 2", Settings(constraints="4:zq"))
    assert constrained.ids[4:4 + len(word)] == word
    stopped = last_reply(chat, "Sort: 3 1 2", Settings(stop_at_eos=True))
    assert stopped.text == plain.text and stopped.forwards <= plain.forwards
    app = last_reply(chat, "Sort: 3 1 2", Settings(sampler="app", constraints="0:zq"))
    assert app.ids[:len(word)] == word


def test_the_zoo_model_is_the_default():
    """load_chat_model() loads the shipped tiny-chat, which answers through the chat's own
    prompt and sampling settings."""
    from genjo_fast.tokenizer import special_ids

    chat = load_chat_model(device="cpu")
    assert chat.name == "tiny-chat" and chat.family == "llada"
    ids = special_ids(chat.tokenizer)
    assert (chat.mask_id, chat.eos_id, chat.stop_ids) == (
        ids["mask_id"], ids["eos_id"], (ids["eos_id"], ids["eot_id"]))
    assert answers(chat, ["What is 21 plus 34?"]) == ["55"]
    with pytest.raises(ChatError, match="not a zoo model"):
        load_chat_model("no-such-model", device="cpu")


def test_a_failing_sampler_is_reported_and_the_chat_goes_on(chat, monkeypatch, capsys):
    from genjo_fast import chat as chat_module
    from genjo_fast.cli import answer

    conversation = Conversation(chat)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (a stand-in)")
    monkeypatch.setattr(chat_module, "run_sampler", broken)
    answer(conversation, "Sort: 3 1 2", Settings(), interactive=False, program="chat")
    assert capsys.readouterr().err == "chat: RuntimeError: CUDA out of memory (a stand-in)\n"
    assert conversation.turns == []
    monkeypatch.undo()
    answer(conversation, "Sort: 3 1 2", Settings(), interactive=False, program="chat")
    assert capsys.readouterr().out.strip() == answers(chat, ["Sort: 3 1 2"])[0]
    assert len(conversation.turns) == 1


# -- through a pipe --------------------------------------------------------------------------

def test_pipe_answers_each_line_and_reports_bad_input(checkpoint, chat):
    expected = answers(chat, ["Sort: 3 1 2", "Reverse: abc"])
    run_ = run(checkpoint, "Sort: 3 1 2\n\n" + "x" * 300 + "\nReverse: abc\n")
    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.splitlines() == expected
    assert "empty message" in run_.stderr
    assert "message too long" in run_.stderr
    assert "Traceback" not in run_.stderr


def test_pipe_reset_forgets_the_conversation(checkpoint, chat):
    first = answers(chat, ["Sort: 3 1 2"])
    run_ = run(checkpoint, "Sort: 3 1 2\nhello\n/reset\nSort: 3 1 2\n/exit\nnever read\n")
    assert run_.returncode == 0, run_.stderr
    lines = run_.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == lines[2] == first[0]


def test_pipe_with_settings_and_sampler_errors(checkpoint, chat):
    settings = Settings(gen_length=16, steps=8, block_length=4, temperature=0.7, seed=3)
    expected = answers(chat, ["Sort: 3 1 2"], settings)
    run_ = run(checkpoint, "Sort: 3 1 2\n", "--gen-length", "16", "--steps", "8",
               "--block-length", "4", "--temperature", "0.7", "--seed", "3")
    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.splitlines() == expected
    # an invalid combination is the sampler's error, on stderr; the chat goes on
    run_ = run(checkpoint, "a\nb\n", "--gen-length", "12", "--block-length", "8")
    assert run_.returncode == 0 and run_.stdout == ""
    assert run_.stderr.count("gen_length (12) must be a multiple of block_length (8)") == 2


def test_pipe_with_a_dream_checkpoint(tmp_path):
    directory = save_dream_checkpoint(tmp_path / "dream")
    dream = load_chat_model(str(directory), device="cpu")
    assert dream.family == "dream" and dream.context == 256
    settings = Settings(steps=16, block_length=8)
    expected = answers(dream, ["Sort: 3 1 2", "Reverse: abc"], settings)
    run_ = run(directory, "Sort: 3 1 2\nReverse: abc\n", "--steps", "16",
               "--block-length", "8")
    assert run_.returncode == 0, run_.stderr
    assert run_.stdout.splitlines() == expected
    run_ = run(directory, "hi\n", "--cfg-scale", "1")
    assert run_.returncode == 2 and "cfg_scale is not an option of Dream" in run_.stderr


def test_bad_model_and_settings_exit_with_a_message(tmp_path, checkpoint):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [(["--model", str(tmp_path / "missing")], "no such directory, and not a zoo model"),
             (["--model", str(tmp_path / "file")], "not a directory"),
             (["--model", str(tmp_path / "empty")], "not a checkpoint directory (no config.json)"),
             (["--model", str(checkpoint), "--alg", "entropy"], "alg is not an option of LLaDA"),
             (["--model", str(checkpoint), "--threads", "0"], "--threads must be >= 1")]
    for flags, message in cases:
        run_ = subprocess.run(COMMAND + flags, input="hi\n", capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert run_.returncode == 2, (flags, run_.stderr)
        assert message in run_.stderr and "Traceback" not in run_.stderr, run_.stderr


def test_switching_to_a_bad_model_keeps_the_chat(checkpoint, chat, tmp_path):
    expected = answers(chat, ["Sort: 3 1 2", "Reverse: abc"])
    run_ = run(checkpoint, f"Sort: 3 1 2\n/model {tmp_path}\nReverse: abc\n")
    assert run_.returncode == 0
    assert "no config.json" in run_.stderr
    assert run_.stdout.splitlines() == expected  # same model, same conversation


# -- on a terminal ---------------------------------------------------------------------------

def test_terminal_chat_through_pexpect(checkpoint, chat):
    pexpect = pytest.importorskip("pexpect")
    expected = answers(chat, ["Sort: 3 1 2", "Reverse: abc"])
    child = pexpect.spawn(COMMAND[0], COMMAND[1:] + ["--model", str(checkpoint)], cwd=ROOT,
                          encoding="utf-8", timeout=300, dimensions=(40, 120),
                          env=dict(os.environ, TERM="xterm"))
    try:
        child.expect("you> ")
        assert "/reset forgets the conversation" in child.before
        for message, answer in zip(["Sort: 3 1 2", "Reverse: abc"], expected):
            child.sendline(message)
            child.expect(r"\x1b\[2m\[(\d+) forwards, 32 tokens in [\d.]+ s \([\d.]+ tokens/s\)\]")
            drawn = child.before
            assert int(child.match.group(1)) == 32
            # drafts drawn in place: masks shown, the line erased and redrawn once per step
            assert "\u2591" in drawn and drawn.count("\x1b[J") >= 32
            # the last drawing is the plain answer
            assert drawn.rsplit("\x1b[J", 1)[1].strip() == f"bot> {answer}".strip()
            child.expect("you> ")
        child.sendline("")  # empty: reported, the chat goes on
        child.expect("empty message")
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_terminal_screen_shows_the_answer_in_place(checkpoint, chat, tmp_path):
    """On a real terminal (tmux), after the answer only the final text stays on screen: every
    draft was overwritten in place."""
    expected = answers(chat, ["Sort: 3 1 2"])[0]
    session = f"genjo-fast-test-{os.getpid()}"
    command = " ".join(COMMAND + ["--model", str(checkpoint)])
    tmux = ["tmux", "-L", session]
    subprocess.run(tmux + ["new-session", "-d", "-s", session, "-x", "100", "-y", "30",
                           f"cd {ROOT} && {command}"], check=True)
    try:
        screen = wait_for_screen(tmux, session, "you>")  # capture-pane drops trailing blanks
        subprocess.run(tmux + ["send-keys", "-t", session, "Sort: 3 1 2", "Enter"], check=True)
        screen = wait_for_screen(tmux, session, "tokens/s)]")
        lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
        at = lines.index("you> Sort: 3 1 2")
        assert lines[at + 1] == f"bot> {expected}".rstrip()
        assert lines[at + 2].startswith("[32 forwards, 32 tokens in ")
        assert "\u2591" not in screen
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)


def wait_for_screen(tmux, session, text, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        screen = subprocess.run(tmux + ["capture-pane", "-p", "-t", session],
                                capture_output=True, text=True).stdout
        if text in screen:
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not on screen after {timeout} s:\n{screen}")
        time.sleep(0.5)
