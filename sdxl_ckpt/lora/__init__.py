"""LoRA files: read kohya / PEFT (diffusers) / old diffusers attention-processor / mindone LoRAs into one model of
(target module, down, up, alpha, mid) groups, convert them name to name, merge them into any checkpoint we read.

``names``   the module index: every LoRA-targetable module of an SDXL structure under each format's name,
            built from the same rule tables the model converters use (never by rewriting ``_`` into ``.``)
``read``    format detection and grouping of a LoRA file's keys; alpha resolution
``delta``   the weight delta of a group (scale * up @ down, conv and Tucker too) and how it lands on an SD tensor
``write``   a group list written as kohya, PEFT or mindone
``inspect`` / ``convert`` / ``merge``: the three commands
"""
