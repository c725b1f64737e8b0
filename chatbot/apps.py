from django.apps import AppConfig


class ChatbotConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chatbot"
    verbose_name = "Leafresh 챗봇"

    def ready(self) -> None:
        from django.db import transaction
        from django.db.models.signals import post_delete, post_save

        from chatbot import checks  # noqa: F401 - registers the deployment checks
        from chatbot.models import Category, GenerationSettings, KnowledgeDocument, ModerationTerm, PromptTemplate
        from chatbot.selectors import config_cache_clear

        def clear(**kwargs: object) -> None:
            config_cache_clear()  # at once, for this process's next read
            transaction.on_commit(config_cache_clear)  # and after commit, in case a reader re-cached the old row

        for model in (Category, PromptTemplate, GenerationSettings, ModerationTerm):
            post_save.connect(clear, sender=model, weak=False, dispatch_uid=f"config-cache-{model.__name__}-save")
            post_delete.connect(clear, sender=model, weak=False, dispatch_uid=f"config-cache-{model.__name__}-delete")

        def reindex(instance: KnowledgeDocument, **kwargs: object) -> None:
            from chatbot.services import knowledge_reindex_later  # not at start-up: it pulls in much

            document_id = instance.pk
            transaction.on_commit(lambda: knowledge_reindex_later(document_id=document_id))

        post_save.connect(reindex, sender=KnowledgeDocument, weak=False, dispatch_uid="knowledge-reindex-save")

        def reindex_category(instance: Category, **kwargs: object) -> None:
            # Its documents' sparse vectors index the label and keywords; their payload the label.
            from chatbot.services import knowledge_reindex_later

            ids = list(instance.documents.values_list("pk", flat=True))
            transaction.on_commit(lambda: [knowledge_reindex_later(document_id=i) for i in ids])

        post_save.connect(reindex_category, sender=Category, weak=False, dispatch_uid="knowledge-reindex-category")
        post_delete.connect(reindex, sender=KnowledgeDocument, weak=False, dispatch_uid="knowledge-reindex-delete")
