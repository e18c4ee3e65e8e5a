"""vlm's prompt builder, GRPO rewards (with the reward hacks of issue 11) and the judge reward against a real
HTTP server on 127.0.0.1."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlm.judge import RUBRIC, chat_url, judge_reward, make_judge_reward, parse_scores
from vlm.prompts import (SYSTEM_PROMPT, VlmError, build_messages, format_question, parse_completion,
                         sft_target)
from vlm.rewards import (accuracy_reward, combined_reward, format_reward, make_format_reward, mcq_choice,
                         parse_reward_weights, token_f1)

OPTIONS = ["Normal tissue", "Adenocarcinoma", "Lymphoma", "Necrosis"]
MCQ = {"images": ["a.png", "b.png"], "question": "What does the tile show?", "options": OPTIONS, "answer": "B",
       "reasoning": "Crowded glands with nuclear atypia."}


def wrap(answer: str, think: str = "Glands are crowded; not lymphoid, not necrotic.") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- prompts

def test_system_prompt_is_patho_r1s():
    assert SYSTEM_PROMPT == ("You are a pathology expert, your task is to answer question step by step. Use the "
                             "following format: <think> Your step-by-step reasoning </think><answer> Your final "
                             "answer </answer>")


def test_format_question_letters_options():
    assert format_question("What is it?", ["x", " y "]) == "What is it?\nA. x\nB. y"
    assert format_question("  Name the tumour. ") == "Name the tumour."
    assert format_question("Q", []) == "Q"


def test_build_messages_is_trls_conversational_vlm_format():
    msgs = build_messages(MCQ, n_images=2)
    assert msgs == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                     {"type": "text", "text": "What does the tile show?\nA. Normal tissue\n"
                                                              "B. Adenocarcinoma\nC. Lymphoma\nD. Necrosis"}]},
    ]
    no_system = build_messages({"question": "Grade?"}, n_images=0, system=None)
    assert no_system == [{"role": "user", "content": [{"type": "text", "text": "Grade?"}]}]
    assert build_messages(MCQ, 1, system="Be brief.")[0]["content"][0]["text"] == "Be brief."
    with pytest.raises(VlmError, match="no 'question'"):
        build_messages({"answer": "B"}, 1)


def test_sft_target_answers_letter_and_option_text():
    assert sft_target(MCQ) == "<think>Crowded glands with nuclear atypia.</think><answer>B. Adenocarcinoma</answer>"
    assert sft_target(MCQ, with_text=False).endswith("<answer>B</answer>")
    # the answer column may be any case, bracketed, or the option's text
    for spelled in ("b", "(B)", "B.", "adenocarcinoma"):
        assert sft_target({**MCQ, "answer": spelled}).endswith("<answer>B. Adenocarcinoma</answer>")
    open_row = {"question": "Name it.", "answer": "Adenocarcinoma", "reasoning": "Glands."}
    assert sft_target(open_row) == "<think>Glands.</think><answer>Adenocarcinoma</answer>"
    with pytest.raises(VlmError, match="no 'reasoning'"):
        sft_target({**MCQ, "reasoning": ""})
    with pytest.raises(VlmError, match="not one of the letters A-D"):
        sft_target({**MCQ, "answer": "E"})


def test_sft_target_earns_full_reward():
    target = sft_target(MCQ)
    assert parse_completion(target)["well_formed"]
    assert combined_reward()([target], answer=["B"], options=[OPTIONS]) == [pytest.approx(1.0)]
    letter_only = sft_target(MCQ, with_text=False)
    assert accuracy_reward([letter_only], answer=["B"], options=[OPTIONS]) == [1.0]


@pytest.mark.parametrize("text,reason", [
    ("<think>a</think><answer>B</answer>", "ok"),
    ("  \n<think>\na\n</think>\n\n<answer> B </answer>\n", "ok"),
    ("<think>a</think><answer></answer>", "empty answer"),
    ("<think>a</think><answer>  </answer>", "empty answer"),
    ("<think> </think><answer>B</answer>", "empty reasoning"),
    ("<answer>B</answer>", "no <think>...</think> block"),
    ("<think>a</think>", "no <answer>...</answer> block"),
    ("<think>a</think><answer>B</answer><answer>C</answer>", "several <answer> blocks"),
    ("<think>a</think><think>b</think><answer>B</answer>", "several <think> blocks"),
    ("<think>a</think><answer>B</answer> so B.", "text outside the blocks or blocks out of order"),
    ("Sure! <think>a</think><answer>B</answer>", "text outside the blocks or blocks out of order"),
    ("<answer>B</answer><think>a</think>", "text outside the blocks or blocks out of order"),
    ("<think>a<answer>B</answer></think>", "text outside the blocks or blocks out of order"),
])
def test_parse_completion_reasons(text, reason):
    parsed = parse_completion(text)
    assert parsed["reason"] == reason
    assert parsed["well_formed"] is (reason == "ok")


def test_parse_completion_returns_the_blocks():
    parsed = parse_completion("<think> look </think>\n<answer> B. Adenocarcinoma </answer>")
    assert parsed["think"] == "look" and parsed["answer"] == "B. Adenocarcinoma"
    two = parse_completion("<think>a</think><answer>B</answer><answer>C</answer>")
    assert two["answer"] is None and two["think"] == "a"


# ---------------------------------------------------------------- format reward

def test_format_reward_strict_and_hacks():
    completions = [
        wrap("B"),                                                  # good
        wrap(""),                                                   # empty answer (Visual-RFT #176)
        wrap("B") + wrap("B"),                                      # repeated blocks (open-r1 #418)
        "<think>a</think><answer>B</answer><answer>B</answer>",     # repeated answer
        wrap("B") + " The answer is B.",                            # trailing text
        "B",                                                        # no tags
        "",
    ]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_format_reward_prefilled_think_template():
    # trl #6966: the template ends the prompt with "<think>", so the completion starts inside the block
    inside = "The glands are crowded.</think><answer>B</answer>"
    assert format_reward([inside]) == [0.0]                         # the old bug: always 0
    assert format_reward([inside], prefilled_think=True) == [1.0]
    prefilled = make_format_reward(True)
    assert prefilled.__name__ == "format_reward"
    assert prefilled([inside, wrap("B"), "a</think><think>b</think><answer>B</answer>", "a</think><answer></answer>"],
                     answer=["B"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert make_format_reward(False)([inside]) == [0.0]


def test_rewards_read_conversational_completions():
    conv = [[{"role": "assistant", "content": wrap("B")}],
            [{"role": "assistant", "content": [{"type": "text", "text": wrap("C")}]}]]
    assert format_reward(conv) == [1.0, 1.0]
    assert accuracy_reward(conv, answer=["B", "B"], options=[OPTIONS, OPTIONS]) == [1.0, 0.0]


# ---------------------------------------------------------------- accuracy reward

@pytest.mark.parametrize("answer", ["B", "b", "(B)", "(b)", "[B]", "B.", "B)", "B:", "Answer: B", "answer: b",
                                    "The answer is B", "The correct answer is (B).", "Final answer: B", "Option B",
                                    "**B**", "B. Adenocarcinoma", "(b) adenocarcinoma.", "B) Adenocarcinoma",
                                    "B - Adenocarcinoma", "Answer: B. ADENOCARCINOMA"])
def test_accuracy_mcq_accepted_spellings(answer):
    assert accuracy_reward([wrap(answer)], answer=["B"], options=[OPTIONS]) == [1.0]


@pytest.mark.parametrize("answer", ["C", "c", "B. Lymphoma", "(B) Necrosis", "B, C", "B and C", "B/C", "B C",
                                    "B. Adenocarcinoma or Lymphoma", "Adenocarcinoma", "E", "Bowel",
                                    "The answer is C", ""])
def test_accuracy_mcq_rejects(answer):
    assert accuracy_reward([wrap(answer)], answer=["B"], options=[OPTIONS]) == [0.0]


def test_accuracy_mcq_hacks_score_zero():
    completions = [wrap(""),                                   # empty answer (Visual-RFT #176)
                   wrap("B") + wrap("B"),                      # repeated blocks (open-r1 #418)
                   "<think>a</think><answer>B</answer><answer>C</answer>",
                   "The answer is B",                          # no answer block
                   "<think>a</think><answer>B"]                # unclosed
    assert accuracy_reward(completions, answer=["B"] * 5, options=[OPTIONS] * 5) == [0.0] * 5


def test_accuracy_reads_the_answer_block_even_when_format_fails():
    text = wrap("B") + " trailing words"
    assert format_reward([text]) == [0.0]
    assert accuracy_reward([text], answer=["B"], options=[OPTIONS]) == [1.0]


def test_accuracy_ground_truth_spellings():
    for truth in ("b", "(B)", "B.", "Adenocarcinoma"):
        assert accuracy_reward([wrap("B")], answer=[truth], options=[OPTIONS]) == [1.0]
    with pytest.raises(VlmError, match="not one of the letters"):
        accuracy_reward([wrap("B")], answer=["Carcinoma in situ"], options=[OPTIONS])


def test_mcq_choice_reads_letter_and_text():
    assert mcq_choice("Answer: (B) Adenocarcinoma.", 4) == ("B", "Adenocarcinoma.")
    assert mcq_choice("d", 4) == ("D", "")
    assert mcq_choice("E", 4) == (None, "")
    assert mcq_choice("A tumour of glands", 4) == (None, "")


def test_accuracy_open_questions_exact_then_token_f1():
    completions = [wrap("The Adenocarcinoma."), wrap("moderately differentiated adenocarcinoma"),
                   wrap("lymphoma"), wrap("")]
    refs = ["adenocarcinoma", "well differentiated adenocarcinoma", "adenocarcinoma", "adenocarcinoma"]
    assert accuracy_reward(completions, answer=refs) == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    assert token_f1("x b c d", "b c") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("a b c d", "b c") == pytest.approx(0.8)    # "a" is an article: dropped


def test_accuracy_mixed_batch_and_column_checks():
    completions = [wrap("B. Adenocarcinoma"), wrap("adenocarcinoma")]
    assert accuracy_reward(completions, answer=["B", "Adenocarcinoma"], options=[OPTIONS, None]) == [1.0, 1.0]
    assert accuracy_reward(completions, answer="B", options=[OPTIONS, OPTIONS]) == [1.0, 0.0]
    with pytest.raises(VlmError, match="2 completions but 1 answers"):
        accuracy_reward(completions, answer=["B"], options=[OPTIONS, OPTIONS])


# ---------------------------------------------------------------- combined reward and weights

def test_combined_reward_patho_r1_weights():
    reward = combined_reward()
    assert reward.__name__ == "combined_reward"
    completions = [wrap("B"), wrap("B") + " extra", wrap("C"), wrap("")]
    assert reward(completions, answer=["B"] * 4, options=[OPTIONS] * 4) == pytest.approx([1.0, 0.9, 0.1, 0.0])
    even = combined_reward((0.5, 0.5), prefilled_think=True)
    assert even(["a</think><answer>B</answer>", "a</think><answer>C</answer>"], answer=["B", "B"],
                options=[OPTIONS, OPTIONS]) == pytest.approx([1.0, 0.5])


def test_parse_reward_weights():
    assert parse_reward_weights("0.1,0.9") == (0.1, 0.9)
    assert parse_reward_weights(" 0.2  0.8 ") == (0.2, 0.8)
    assert parse_reward_weights("0.1,0.8,0.1", n=3) == (0.1, 0.8, 0.1)
    for bad in ("0.1", "a,b", "-1,2", "0,0", "nan,1", "0.1,0.9,0.5", ""):
        with pytest.raises(VlmError, match="--reward-weights .*give 2 non-negative numbers"):
            parse_reward_weights(bad)
    with pytest.raises(VlmError, match="combined_reward weights"):
        combined_reward((1.0,))


# ---------------------------------------------------------------- judge reward, real HTTP server

class JudgeHandler(BaseHTTPRequestHandler):
    """Answers like an OpenAI-compatible server; the path's first segment picks the behaviour."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        JudgeHandler.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        mode = self.path.strip("/").split("/")[0]
        if mode == "error":
            return self._send(500, b'{"error": "overloaded"}')
        if mode == "slow":
            time.sleep(1.5)
        content = {"good": '{"integrity_score": 0.6, "knowledge_score": 1.4}',
                   "fenced": 'Here:\n```json\n{"integrity_score": -0.2, "knowledge_score": 0.6}\n```',
                   "bad": "The reasoning looks solid, integrity high.",
                   "partial": '{"integrity_score": 0.6}',
                   "slow": '{"integrity_score": 1.0, "knowledge_score": 1.0}'}.get(mode)
        if mode == "html":
            return self._send(200, b"<html>gateway</html>")
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


RIGHT, WRONG = wrap("B. Adenocarcinoma"), wrap("C")


def judge(url: str, completions=(RIGHT, WRONG), **kw) -> list[float]:
    n = len(completions)
    return judge_reward(list(completions), question=[MCQ["question"]] * n, answer=["B"] * n,
                        options=[OPTIONS] * n, judge_url=url, judge_model="judge-7b", **kw)


def test_judge_good_json_sends_rubric_and_key(judge_server, monkeypatch):
    monkeypatch.setenv("PATHMIL_TEST_JUDGE_KEY", "sk-test")
    JudgeHandler.requests.clear()
    # 0.6 and 1.4 -> 0.6 and 1.0 -> 0.8, whether the answer is right or not
    assert judge(f"{judge_server}/good/v1", api_key_env="PATHMIL_TEST_JUDGE_KEY") == pytest.approx([0.8, 0.8])
    assert len(JudgeHandler.requests) == 2
    req = JudgeHandler.requests[0]
    assert req["path"] == "/good/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-7b"
    system, user = req["body"]["messages"]
    assert system == {"role": "system", "content": RUBRIC}
    assert "What does the tile show?\nA. Normal tissue" in user["content"]
    assert "Reference answer: B" in user["content"]
    sent = sorted(r["body"]["messages"][1]["content"].split("Model response:\n")[1] for r in JudgeHandler.requests)
    assert sent == sorted([RIGHT, WRONG])


def test_judge_without_key_sends_no_authorization(judge_server, monkeypatch):
    monkeypatch.delenv("PATHMIL_TEST_NO_KEY", raising=False)
    JudgeHandler.requests.clear()
    assert judge(f"{judge_server}/good/v1/chat/completions", completions=[RIGHT],
                 api_key_env="PATHMIL_TEST_NO_KEY") == pytest.approx([0.8])
    assert JudgeHandler.requests[0]["auth"] is None


def test_judge_fenced_json_is_clipped(judge_server):
    # -0.2 -> 0.0, 0.6 -> 0.6: mean 0.3
    assert judge(f"{judge_server}/fenced/v1") == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("mode", ["bad", "partial", "html", "error"])
def test_judge_unusable_replies_fall_back(judge_server, mode):
    # right answer -> 0.5 for each score -> 0.5; wrong answer -> 0
    assert judge(f"{judge_server}/{mode}/v1") == [0.5, 0.0]


def test_judge_timeout_falls_back_without_waiting(judge_server):
    start = time.perf_counter()
    assert judge(f"{judge_server}/slow/v1", timeout=0.3) == [0.5, 0.0]
    assert time.perf_counter() - start < 1.2      # the two requests ran side by side and gave up at 0.3 s


def test_judge_unreachable_server_falls_back():
    import socket

    with socket.socket() as s:                    # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert judge(f"http://127.0.0.1:{port}/v1", timeout=2) == [0.5, 0.0]


def test_make_judge_reward_binds_endpoint(judge_server):
    reward = make_judge_reward(f"{judge_server}/good/v1", "judge-7b", timeout=5)
    assert reward.__name__ == "judge_reward"
    # trl passes every dataset column; unknown ones are ignored
    assert reward([RIGHT], question=["Q"], answer=["B"], options=[OPTIONS], images=[["a.png"]]) == \
        pytest.approx([0.8])
    with pytest.raises(VlmError, match="--judge-url 'localhost:8000' is not an http"):
        make_judge_reward("localhost:8000", "judge-7b")
    with pytest.raises(VlmError, match="--judge-model is empty"):
        make_judge_reward("http://127.0.0.1:1/v1", "")


def test_judge_helpers():
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert parse_scores('{"integrity_score": "0.2", "knowledge_score": 0.6}') == pytest.approx(0.4)
    assert parse_scores('{"integrity_score": true, "knowledge_score": 0.6}') is None
    assert parse_scores('{"integrity_score": NaN, "knowledge_score": 0.6}') is None
    assert parse_scores("no json") is None
