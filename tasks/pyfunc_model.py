"""The file MLflow runs to load a logged TDM model ("models from code"; see ``tasks.pyfunc``)."""

from mlflow.models import set_model

from tasks.pyfunc import TDMRecommenderModel

set_model(TDMRecommenderModel())
