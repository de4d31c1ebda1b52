"""Native Phi-3.5-vision for transformers 5: model, processor and the finetuning recipe's shared code.

Importing ``phi3v`` registers the classes with the transformers Auto classes, so an official
``microsoft/Phi-3.5-vision-instruct`` folder loads with ``AutoModelForCausalLM`` / ``AutoProcessor``
and no remote code (checkpoint-supplied code runs only when the caller opts in with ``trust_remote_code``).
"""

from .console import quiet_expected_messages

quiet_expected_messages()  # before the libraries below log what every run here expects (phi3v/console.py)

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor  # noqa: E402

from .models.configuration import Phi3VConfig  # noqa: E402
from .models.modeling import Phi3VForCausalLM, Phi3VModel  # noqa: E402
from .models.processing import Phi3VImageProcessor, Phi3VProcessor  # noqa: E402

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
# One implementation (PIL resize, as the official processor) serves both backends the Auto class may ask for.
AutoImageProcessor.register(
    Phi3VConfig,
    image_processor_classes={"torchvision": Phi3VImageProcessor, "pil": Phi3VImageProcessor},
    exist_ok=True,
)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VModel", "Phi3VImageProcessor", "Phi3VProcessor"]
