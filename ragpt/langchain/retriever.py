"""`RagptRetriever`: a department's view of a ragpt index as a LangChain retriever."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field

from ragpt.langchain._core import AUTO, route
from ragpt.retrieval.search import RetrievedChunk
from ragpt.serving.pipeline import Pipeline


def to_document(hit: RetrievedChunk, department: str) -> Document:
    c = hit.chunk
    return Document(
        page_content=c.text,
        metadata={"source": c.source, "title": c.title, "chunk": c.chunk, "score": hit.score, "rank": hit.rank,
                  "start": c.start, "end": c.end, "department": department},
    )


class RagptRetriever(BaseRetriever):
    """Department-scoped hybrid search over the pipeline's index.

    The department filter is applied inside the search (ragpt's isolation rule), so the k
    documents are the department's own best k. `department="auto"` routes each query first.

        retriever = RagptRetriever(pipeline=Pipeline.open(index="sample"), department="hr", k=3)
        docs = retriever.invoke("How many vacation days?")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pipeline: Pipeline = Field(exclude=True)
    department: str
    k: int | None = None  # None: the pipeline's settings.k
    filters: dict[str, Any] | None = None  # metadata filters, as Pipeline.retrieve takes them

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        dept = route(self.pipeline, [query])[0] if self.department == AUTO else self.department
        return [to_document(h, dept) for h in self.pipeline.retrieve(query, dept, self.k, self.filters)]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        # Embedding and FAISS search are blocking CPU work: keep them off the event loop.
        return await run_in_executor(None, self._get_relevant_documents, query, run_manager=run_manager.get_sync())
