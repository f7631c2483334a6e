"""osteo_model: the science of OsteoFL (CT reading, vertebra crops, radiomics, networks, calibration).

Never imports Flower: everything here trains and evaluates centrally as well as inside a federation.
"""
