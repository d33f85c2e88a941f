"""babelforge: turn small multilingual models into strong retrieval embedders on Ray.

The library is organised by pipeline stage:

- :mod:`babelforge.data`    ingestion of multilingual corpora on Ray Data
- :mod:`babelforge.synth`   persona-conditioned synthesis of (query, positive, hard negative)
- :mod:`babelforge.filter`  ranking-consistency filtering with a teacher embedder and faiss
- :mod:`babelforge.mine`    hard-negative mining with false-negative guards
- :mod:`babelforge.train`   contrastive training (Ray Train + DeepSpeed)
- :mod:`babelforge.eval`    retrieval evaluation (nDCG@10, Recall@k, MRR)
- :mod:`babelforge.serve`   Ray Serve embedding endpoint
- :mod:`babelforge.models`  the embedding model core (no Ray inside)
"""

__version__ = "0.1.0"

import logging as _logging

# faiss logs every CPU-specific build it fails to find (AVX512-SPR, AVX512, AVX2) at INFO, which
# floods job logs from every Ray worker that imports it; its real errors are WARNING and above.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)
