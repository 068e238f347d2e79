"""The start_percent / end_percent pair of every node that acts on part of the sampling schedule."""


def schedule_range_inputs(starts: str, stops: str) -> dict:
    """The two FLOAT inputs, 0 to 1 of the schedule; `starts`, `stops`: what happens there ("this subject starts
    acting"), as the tooltips say it. Nodes check the pair with checked_inputs(("start_percent", "end_percent"))."""
    return {
        "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": f"Where in the schedule {starts}, 0 to 1 (0 = the first step)."}),
        "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": f"Where in the schedule {stops}, 0 to 1 (1 = the last step); above "
                                             f"start_percent."}),
    }
