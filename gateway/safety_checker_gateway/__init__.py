"""An HTTP gateway in front of Triton: the seed runtime's route and OpenAI's moderation API."""
