from .subject_attention import SubjectBinding, plain_attention, subject_attention

__all__ = ["SubjectBinding", "plain_attention", "subject_attention"]
