"""The Flower runtimes (flwr 1.41, Message API): the same silo workers and round loop as in-process, reached
through Flower's simulation engine (`flower-sim`) or a SuperLink and SuperNodes on other machines (`flower`)."""
