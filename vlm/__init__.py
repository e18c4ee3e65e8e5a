"""pathmil's `vlm`: the pathology reasoner of issue 11 (Patho-R1 / PathVLM-R1 on trl).

Built so far (pure Python, no model):
- prompts: the one prompt builder every stage uses: Patho-R1's `SYSTEM_PROMPT`, `format_question`,
  `build_messages` (trl's conversational VLM format), `sft_target`, `parse_completion`.
- rewards: GRPO/DAPO rewards in trl's signature: `format_reward` / `make_format_reward` (pre-filled
  `<think>` templates too), `accuracy_reward` (MCQ letter + option text, open questions by exact match /
  token F1), `combined_reward` (0.1 format + 0.9 accuracy), `parse_reward_weights`.
- judge: PathVLM-R1's process reward through any OpenAI-compatible endpoint (`judge_reward`,
  `make_judge_reward`), with its fallback on bad replies, timeouts and HTTP errors.

Not built yet: `vlm make-tiny`, `vlm data`, `vlm train --stage caption|sft|grpo|dapo` (trl SFTTrainer /
GRPOTrainer, peft LoRA, DAPO dynamic sampling; DAPO's overlong penalty comes from trl's
`get_soft_overlong_punishment`), the PathoCLIP grounding reward, `vlm eval`, `vlm ask`, the CLI and the
benchmark.
"""
from __future__ import annotations
