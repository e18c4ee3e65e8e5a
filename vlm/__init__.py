"""pathmil's `vlm`: the pathology reasoner (Patho-R1 / PathVLM-R1 on trl).

- prompts: the one prompt builder every stage uses: Patho-R1's `SYSTEM_PROMPT`, `format_question`,
  `build_messages` (trl's conversational VLM format; a caption mode for the caption stage, whose system
  prompt asks for no tags), `sft_target`, `parse_completion`, `template_prefills_think`.
- rewards: GRPO/DAPO rewards in trl's signature: `format_reward` / `make_format_reward` (pre-filled
  `<think>` templates too), `accuracy_reward` (MCQ letter + option text, open questions by exact match /
  token F1), `combined_reward` (0.1 format + 0.9 accuracy), `parse_reward_weights`.
- judge: PathVLM-R1's process reward through any OpenAI-compatible endpoint (`JudgeReward`,
  `make_judge_reward`): the response delimited, only a reply that is exactly the score object counts,
  the fallback on bad replies, timeouts and HTTP errors, a batch deadline and a circuit breaker;
  judge_client: the endpoint (`JudgeEndpoint`, the openai client; key over https or to loopback only).
- tiny (`vlm make-tiny OUT_DIR`): a 0.42M-parameter random-weight Qwen2.5-VL model folder (tokenizer trained
  offline with `tokenizers`, the real Qwen2.5-VL chat template and processors, `pathmil_defaults.json` with
  the training defaults a model this small needs; `read_defaults`).
- model: `load_model` (AutoModelForImageTextToText + AutoProcessor from a folder or a hub id; offline and
  not cached: the encoders' one-line error; bf16 on GPU, fp32 on CPU) and batched, left-padded `generate`.
- data (`vlm data STORE --labels NAME --captions CSV --out DIR`): caption.jsonl, mcq.jsonl, sft.jsonl from a
  store (`make_data`); `read_jsonl(path, stage)` validates rows and skips bad lines by number;
  `load_image(s)` reads store references {"store", "slide", "tile"} and files.
- grounding: the offline process reward, PathoCLIP grounding (`make_grounding_reward`, `grounding_scores`,
  `findings`, `NegativeBank`): the asserting sentences of <think> scored by PathoCLIP against the
  completion's image versus a fixed, seeded bank of tiles of the other classes, sigmoid(logit_scale *
  contrastive margin) in [0, 1]; no reasoning: 0.
- evaluate (`vlm eval --model M --data mcq.jsonl --out RESULT.json`): batched generation over MCQ / open
  rows, each scored with the training rewards (`score_completions`, `summarize`, `evaluate`): accuracy,
  format rate, mean reward and PathMMU-style per-item records; generation length and reward weights default
  to the evaluated run's own (`run_generation`).
- ask (`vlm ask --store S --slide ID --question Q --model M --run NAME | --clip RUN_DIR`): the slide's top-k
  tiles by a MIL run's stored instance scores (from the store, never `mil`) or by PathoCLIP similarity to
  the question (`select_tiles`), one multi-image prompt (`ask`), a montage of the tiles (`save_montage`).
- train (`vlm train --stage caption|sft|grpo|dapo --data F --model M --out RUN_DIR`): trl SFTTrainer
  (completion-only loss, `max_length=None`) and GRPOTrainer (format + accuracy rewards, optional process
  rewards `--grounding CLIP` and `--judge-url/--judge-model`; dapo: loss_type "dapo", epsilon_high 0.28,
  masked truncation, trl's soft overlong punishment), peft LoRA merged at the end, `--freeze-vision`,
  `--vllm colocate|server`, settings from the model folder's pathmil_defaults.json, per-device precision /
  checkpointing / threads, resume (weights from safetensors, trainer state with weights_only), several
  processes under accelerate / torchrun (RUN_DIR written by the main process; configs in
  configs/accelerate/) (`train`, `resolve_settings`, `build_dataset`).
- run_state: what a `vlm train` rerun does with RUN_DIR (`plan_run`): run.json records the stage, model,
  data digest and settings; another run is refused by name, a finished one left as it is, a LoRA checkpoint
  resumed as the model plus its adapter (`start_model`).
- reward_set: the reward functions and weights of a grpo / dapo run (`reward_names`, `reward_functions`;
  `recorded_settings`: the settings as run files hold them, the judge URL as a digest).
- dynamic: DAPO's dynamic sampling as a GRPOTrainer subclass (`DynamicSamplingTrainer`,
  `informative_groups`, `select_rows`, `concat_batches`): zero-variance groups dropped, the batch
  refilled from the data for a bounded number of tries, counts logged per step.
- cli: `vlm make-tiny`, `vlm data`, `vlm train`, `vlm eval`, `vlm ask`.
"""
from __future__ import annotations
