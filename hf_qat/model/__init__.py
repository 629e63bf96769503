"""Model surgery: which weights a QATConfig covers (:mod:`.targets`), the QAT state of one weight
(:mod:`.unit`), the layers and expert stacks that hold it (:mod:`.modules`, :mod:`.experts`), a llama.cpp
file type as one family per weight (:mod:`.file_type`), and installing, switching and removing QAT
(:mod:`.convert`). See docs/architecture.md."""
