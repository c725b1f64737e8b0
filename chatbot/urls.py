from django.urls import path

from chatbot import metrics, openai_api, views

urlpatterns = [
    path("", views.index, name="index"),
    path("conversation/new", views.new_conversation, name="new-conversation"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    path("ai/chatbot/recommendation/base-info", views.base_info, name="base-info"),
    path("ai/chatbot/recommendation/free-text", views.free_text, name="free-text"),
    path("ai/chatbot/sessions/<str:session_id>/messages", views.session_messages, name="session-messages"),
    # The OpenAI-compatible API (chatbot.openai_api)
    path("v1/models", openai_api.models, name="openai-models"),
    path("v1/models/<str:model_id>", openai_api.model, name="openai-model"),
    path("v1/chat/completions", openai_api.chat_completions, name="openai-chat-completions"),
]
