"""LangChain integration: ragpt as runnables that compose with the rest of an LCEL app.

    RagptRetriever          a department's scope of a ragpt index, as a BaseRetriever
    SoftPromptChatModel     the frozen generator + a department's soft prompt, as a BaseChatModel
    RagptChain / rag_chain  question -> {answer, sources, department, prompt_version, contract, ...} per call
    RagptServiceChatModel   a running ragpt service (OpenAI-compatible API) as a BaseChatModel

See docs/langchain.md.
"""

from ragpt.langchain.chain import RagptChain, rag_chain
from ragpt.langchain.chat_model import SoftPromptChatModel
from ragpt.langchain.retriever import RagptRetriever
from ragpt.langchain.service import RagptServiceChatModel, ServiceError

__all__ = ["RagptChain", "RagptRetriever", "RagptServiceChatModel", "ServiceError", "SoftPromptChatModel",
           "rag_chain"]
