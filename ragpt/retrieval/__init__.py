"""The FAISS + BM25 index, department-scoped search, and the department router."""
