from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingJobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_JOB_STATUS_UNSPECIFIED: _ClassVar[TrainingJobStatus]
    PENDING: _ClassVar[TrainingJobStatus]
    RUNNING: _ClassVar[TrainingJobStatus]
    SUCCEEDED: _ClassVar[TrainingJobStatus]
    FAILED: _ClassVar[TrainingJobStatus]
TRAINING_JOB_STATUS_UNSPECIFIED: TrainingJobStatus
PENDING: TrainingJobStatus
RUNNING: TrainingJobStatus
SUCCEEDED: TrainingJobStatus
FAILED: TrainingJobStatus

class StartTrainingJobRequest(_message.Message):
    __slots__ = ("display_name", "training_script_plugin", "dataset_query", "hyperparameters", "base_model_plugin")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SCRIPT_PLUGIN_FIELD_NUMBER: _ClassVar[int]
    DATASET_QUERY_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_PLUGIN_FIELD_NUMBER: _ClassVar[int]
    display_name: str
    training_script_plugin: str
    dataset_query: str
    hyperparameters: _containers.ScalarMap[str, str]
    base_model_plugin: str
    def __init__(self, display_name: _Optional[str] = ..., training_script_plugin: _Optional[str] = ..., dataset_query: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, str]] = ..., base_model_plugin: _Optional[str] = ...) -> None: ...

class StartTrainingJobResponse(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetTrainingJobStatusRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("job_id", "training_script_plugin", "display_name", "status", "airflow_state", "cancelled", "tasks", "model_name", "model_version", "start_time", "end_time")
    class TasksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SCRIPT_PLUGIN_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AIRFLOW_STATE_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    training_script_plugin: str
    display_name: str
    status: TrainingJobStatus
    airflow_state: str
    cancelled: bool
    tasks: _containers.ScalarMap[str, str]
    model_name: str
    model_version: str
    start_time: str
    end_time: str
    def __init__(self, job_id: _Optional[str] = ..., training_script_plugin: _Optional[str] = ..., display_name: _Optional[str] = ..., status: _Optional[_Union[TrainingJobStatus, str]] = ..., airflow_state: _Optional[str] = ..., cancelled: _Optional[bool] = ..., tasks: _Optional[_Mapping[str, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., start_time: _Optional[str] = ..., end_time: _Optional[str] = ...) -> None: ...

class GetTrainingJobStatusResponse(_message.Message):
    __slots__ = ("status", "job")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    status: TrainingJobStatus
    job: TrainingJob
    def __init__(self, status: _Optional[_Union[TrainingJobStatus, str]] = ..., job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("training_script_plugin", "status", "limit")
    TRAINING_SCRIPT_PLUGIN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    training_script_plugin: str
    status: TrainingJobStatus
    limit: int
    def __init__(self, training_script_plugin: _Optional[str] = ..., status: _Optional[_Union[TrainingJobStatus, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class StreamTrainingJobLogsRequest(_message.Message):
    __slots__ = ("job_id", "task", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., task: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("task", "line")
    TASK_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    task: str
    line: str
    def __init__(self, task: _Optional[str] = ..., line: _Optional[str] = ...) -> None: ...
