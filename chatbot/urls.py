from django.urls import path

from chatbot import metrics, views

urlpatterns = [
    path("", views.index, name="index"),
    path("conversation/new", views.new_conversation, name="new-conversation"),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", metrics.metrics, name="metrics"),
    path("ai/chatbot/recommendation/base-info", views.base_info, name="base-info"),
    path("ai/chatbot/recommendation/free-text", views.free_text, name="free-text"),
    path("ai/chatbot/sessions/<str:session_id>/messages", views.session_messages, name="session-messages"),
]
